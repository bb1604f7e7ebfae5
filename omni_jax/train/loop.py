"""The trainer: config files, model init, the step loop, Orbax checkpoints (exact resume), metrics, eval, SIGTERM.

    omni-jax train --config configs/toy.py[:arg] --workdir DIR [--config.section.key=value ...] [--init-from DIR]

Workdir layout: `checkpoints/<step>/` (Orbax CheckpointManager: params, frozen params, optimizer state, RNG,
step, and the data iterator's state as JSON), `metrics.jsonl` (one JSON object per logged step; eval rows carry
eval_loss / eval_exact_match), `tensorboard/` (event files), `tokenizer/` (when the model has no tokenizer
directory of its own) and `export/` (the final model as an omni_jax Orbax model directory: `omni-jax generate
--model DIR/export`, `omni-jax convert --model DIR/export --to hf --out HF_DIR`).

Resume: a run started on a workdir with checkpoints continues from the latest one; the data order, optimizer
state and RNG are restored, so the per-step losses equal those of an uninterrupted run bit for bit (on the same
device kind). Metric rows past the restored step (written by a killed run after its last checkpoint) are
dropped. SIGTERM (preemption) saves a checkpoint after the current step and exits cleanly.

Mesh training (`config.mesh.spec`, e.g. "data=2,expert=4"; `omni-jax train --mesh SPEC --rules NAME`): the
parameters are created (or loaded) directly at the shardings the rules table of omni_jax.sharding gives, the
optimizer state mirrors them, each batch is split over the `data` x `fsdp` mesh axes on its leading dim, and the
steps are compiled with those shardings and traced under `sharding.activate` (so MoE layers run expert-parallel
over `expert`; the talker's too under train.task="talker", whose batch keys come from the task). Checkpoints
restore onto the current shardings, so a run may resume on a different mesh.

Several processes (a TPU pod, multi-node GPU; omni_jax.distributed joins them first) run one job: without a mesh
spec the mesh is `fsdp=-1` over every device of every process, and a mesh must cover them all. data.batch_size is
the global batch; each process feeds the rows its devices hold (train/data.py). Process 0 writes metrics.jsonl,
TensorBoard events, the export's side files and the example question; checkpoints and exported parameters are
written by all through Orbax. A SIGTERM to any process stops all after the same step (distributed.StopFlag). The
workdir, --init-from and data files may be URLs (omni_jax.paths).
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from omni_jax import distributed as dist
from omni_jax import paths
from omni_jax import sharding as S
from omni_jax.config import ConfigError, OmniConfig
from omni_jax.errors import OmniJaxError
from omni_jax.kernels.impls import check_impl
from omni_jax.train import data as D
from omni_jax.train import step as TS

log = logging.getLogger("omni_jax.train")
REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


class TrainError(OmniJaxError):
    """A training run that cannot start (workdir not writable, missing model directory, ...)."""


# ------------------------------------------------------------------------------------------------- config files


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path/to/file.py[:arg]` (or a name in the repository's configs/, e.g. `toy:quick`) -> get_config(arg)."""
    path, _, arg = spec.partition(":")
    if not path.endswith(".py") and not os.path.exists(path):
        path = os.path.join(REPO_CONFIGS, path + ".py")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    mod_spec = importlib.util.spec_from_file_location(f"omni_jax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config(arg) function")
    cfg = module.get_config(arg or None)
    cfg.lock()  # unknown keys in overrides are errors
    return cfg


def _parse_value(text: str, current):
    if isinstance(current, bool):
        low = text.lower()
        if low not in ("true", "false", "1", "0"):
            raise ConfigError(f"expected true/false, got {text!r}")
        return low in ("true", "1")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, (tuple, list)):
        v = ast.literal_eval(text)
        return tuple(v) if isinstance(v, (tuple, list)) else (v,)
    return text


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Apply `--config.a.b=value` strings (also `config.a.b=value`); unknown keys raise ConfigError."""
    for item in overrides:
        key, eq, text = item.lstrip("-").partition("=")
        if not eq or not key.startswith("config."):
            raise ConfigError(f"bad override {item!r}: expected --config.section.key=value")
        parts = key[len("config."):].split(".")
        node = cfg
        for i, name in enumerate(parts):
            if not isinstance(node, ml_collections.ConfigDict) or name not in node:
                keys = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
                close = difflib.get_close_matches(name, keys, n=3)
                hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(keys)}"
                raise ConfigError(f"unknown config key {'.'.join(parts[:i + 1])!r}{hint}")
            if i < len(parts) - 1:
                node = node[name]
        try:
            node[parts[-1]] = _parse_value(text, node[parts[-1]])
        except (ValueError, SyntaxError) as e:
            raise ConfigError(f"bad value for {key}: {text!r} ({e})") from e
    return cfg


def _section(cfg, name: str, cls, ignore: tuple[str, ...] = ()):
    d = {k: v for k, v in dict(cfg[name]).items() if k not in ignore}
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - fields
    if unknown:
        raise ConfigError(f"unknown keys in config.{name}: {sorted(unknown)}; known: {sorted(fields)}")
    return cls(**d)


# ------------------------------------------------------------------------------------------------------- model


def _check_fits(mesh, mcfg: OmniConfig, parts):
    texts = [("thinker", mcfg.thinker_config.text_config)]
    if "talker" in parts and mcfg.enable_audio_output:
        texts.append(("talker", mcfg.talker_config.text_config))
    S.check_model_fits(mesh, texts)


def build_model(cfg, init_from: str | None, mesh=None, rules=S.DEFAULT_RULES):
    """(OmniModel, OmniConfig, tokenizer directory or None). With a mesh every parameter is created (or read)
    directly at its sharding under `rules`; the whole model never sits on one device."""
    from omni_jax.models.omni import OmniModel

    parts = tuple(cfg.model.parts)
    init_from = init_from or cfg.model.init_from
    if init_from:
        from omni_jax.inference import load_model

        init_from = paths.resolve(init_from)
        if not paths.isdir(init_from):
            raise TrainError(f"--init-from: model directory not found: {init_from}")
        model, mcfg = load_model(init_from, dtype=cfg.model.dtype, parts=parts, mesh=mesh, rules=rules)
        if mesh is not None:
            _check_fits(mesh, mcfg, parts)
        return model, mcfg, init_from
    if cfg.model.preset == "toy":
        from omni_jax.train.toy import toy_model_config

        mcfg = toy_model_config(speech="talker" in parts or "code2wav" in parts)
    else:
        from omni_jax.config import preset

        mcfg = preset(cfg.model.preset)
    if "talker" not in parts and mcfg.enable_audio_output:
        mcfg = dataclasses.replace(mcfg, enable_audio_output=False)
    def factory():
        return OmniModel(mcfg, dtype=jnp.dtype(cfg.model.dtype), rngs=nnx.Rngs(cfg.model.seed), parts=parts)

    if mesh is None:
        return factory(), mcfg, None
    _check_fits(mesh, mcfg, parts)
    return S.create_sharded(factory, mesh, rules), mcfg, None


def _write_tokenizer(out: str, mcfg: OmniConfig) -> str:
    from omni_jax.config import TINY_VOCAB
    from omni_jax.processing.tiny_tokenizer import write_processor_config, write_tiny_tokenizer

    if mcfg.thinker_config.text_config.vocab_size != TINY_VOCAB:
        raise TrainError("a randomly initialised model other than the tiny/toy presets has no tokenizer: use "
                         "--init-from with an HF directory")
    os.makedirs(out, exist_ok=True)
    write_tiny_tokenizer(out)
    write_processor_config(out)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"do_sample": False, "max_new_tokens": 16, "eos_token_id": [mcfg.im_end_token_id],
                   "pad_token_id": mcfg.im_end_token_id}, f, indent=2)
    return out


def _local_side_files(src: str, out: str) -> str:
    """Copy a model directory's tokenizer / processor / config files (not the weights) from a URL to `out`."""
    from omni_jax.checkpoint.hf import SIDE_FILES

    os.makedirs(out, exist_ok=True)
    for fn in (*SIDE_FILES, "config.json"):
        if paths.exists(paths.join(src, fn)):
            paths.path(paths.join(src, fn)).copy(os.path.join(out, fn), overwrite=True)
    return out


def active_params(params, mcfg: OmniConfig) -> float:
    """Trainable parameters touched per token (expert tensors weighted by top-k / experts), for the MFU
    estimate (6 * active params FLOPs per token; attention's sequence-length term is left out)."""
    t = mcfg.thinker_config.text_config
    frac = t.num_experts_per_tok / t.num_experts if t.num_experts else 1.0
    total = 0.0
    for path, v in nnx.to_flat_state(params):
        n = float(np.prod(v.shape))
        total += n * frac if "experts" in map(str, path) else n
    return total


# ------------------------------------------------------------------------------------------------------ trainer


def talker_task(cfg):
    """config.train.task: "thinker" (default) -> None; "talker" -> omni_jax.train.talker.TalkerTask (its loss,
    data with codec targets, eval and log rows replace the thinker's)."""
    task = cfg.train.get("task", "thinker")
    if task == "thinker":
        return None
    if task != "talker":
        raise ConfigError(f"unknown train.task {task!r}; choose thinker or talker")
    from omni_jax.train.talker import TalkerTask

    return TalkerTask.from_config(cfg)


def check_workdir(workdir: str):
    """Create the workdir (a local path or a URL) and check that this process can write there."""
    try:
        paths.makedirs(workdir)
        probe = paths.path(paths.join(workdir, f".write_test.{jax.process_index()}"))
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise TrainError(f"workdir {workdir} is not writable ({e.strerror or e})") from e


def local_dir(workdir: str) -> str:
    """A local folder of this process for files that are read with plain file APIs (the generated tokenizer, toy
    data): the workdir itself for a single-process run on a local workdir, `workdir/process_<i>` with several
    processes (they would otherwise write the same files at once), a temporary folder for a URL workdir."""
    if paths.is_url(workdir):
        import tempfile

        return tempfile.mkdtemp(prefix="omni_jax_local_")
    if jax.process_count() == 1:
        return workdir
    return os.path.join(workdir, f"process_{jax.process_index()}")


def _job_config(cfg, workdir: str, init_from, mesh) -> str:
    """What every process of a job must agree on: the config (but the train.debug_* test hooks), workdir, model
    source and mesh."""
    cfg = ml_collections.ConfigDict(cfg.to_dict())
    for key in [k for k in cfg.train if k.startswith("debug_")]:
        cfg.train[key] = 0
    return json.dumps([cfg.to_json(sort_keys=True), workdir, init_from, None if mesh is None else dict(mesh.shape)])


def _to_device(batch: dict, shardings: dict | None = None) -> dict:
    """A host batch -> device arrays ([B, 3, T] positions -> [3, B, T]). With `shardings` (a NamedSharding per
    key) each process supplies its own rows and gets global arrays split over the mesh."""
    b = dict(batch)
    b["positions"] = np.ascontiguousarray(np.moveaxis(b["positions"], 1, 0))  # [B, 3, T] -> [3, B, T]
    if shardings is None:
        return jax.tree.map(jnp.asarray, b)
    if set(b) != set(shardings):
        raise TrainError(f"batch keys {sorted(b)} differ from the compiled ones {sorted(shardings)}")
    return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in b.items()}


# ------------------------------------------------------------------------------------------------- mesh


BATCH_MESH_AXES = ("data", "fsdp")  # the leading (example) dim of every batch array is split over these


def mesh_config(cfg) -> tuple[str, str]:
    """(mesh spec, rules preset) from config.mesh; configs without that section train on one device."""
    m = cfg.get("mesh") if hasattr(cfg, "get") else None
    if not m:
        return "", "default"
    return str(m.get("spec", "") or ""), str(m.get("rules", "default") or "default")


def batch_keys(c: D.DataConfig, task=None) -> tuple[str, ...]:
    """The arrays of a training batch for this data config (see train/data.py), plus those of a talker task
    (`TalkerTask.batch_dims`)."""
    keys = ["input_ids", "positions", "valid", "loss_mask"]
    if c.audio_slots:
        keys += ["audio_features", "audio_frames", "audio_valid"]
    if c.image_slots:
        keys += ["image_pixels", "image_valid"]
    if task is not None:
        keys += [k for k in task.batch_dims() if k not in keys]
    return tuple(keys)


def batch_shardings(mesh, c: D.DataConfig, task=None) -> dict:
    """NamedSharding per batch key: the example dim over the data and fsdp axes (dim 0; dim 1 of [3, B, T]
    positions; a talker task names the example dim of each of its keys)."""
    axes = tuple(a for a in BATCH_MESH_AXES if mesh.shape[a] > 1)
    lead = None if not axes else axes[0] if len(axes) == 1 else axes
    dims = {"positions": 1, **({} if task is None else task.batch_dims())}
    return {k: NamedSharding(mesh, P(*[None] * dims.get(k, 0), lead)) for k in batch_keys(c, task)}


def opt_state_shardings(tx, params, param_shardings, mesh):
    """Shardings for `tx.init(params)`: a leaf whose tree path ends with a parameter's path (Adam's mu / nu,
    MultiSteps' accumulated gradients, ...) and has its shape takes that parameter's sharding; the rest
    (step counters) is replicated."""

    def key(path):
        return tuple(str(k) for k in path)

    by_path = {}
    for (path, leaf), sh in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_shardings),
                                strict=True):
        by_path[key(path)] = (leaf.shape, sh)
    replicated = NamedSharding(mesh, P())

    def pick(path, leaf):
        k = key(path)
        for n in range(len(k), 0, -1):
            hit = by_path.get(k[-n:])
            if hit is not None and hit[0] == leaf.shape:
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(pick, jax.eval_shape(tx.init, params))


class MetricsLog:
    """metrics.jsonl and TensorBoard events of the run, written by the primary process only (`enabled`)."""

    def __init__(self, workdir: str, resume_step: int, enabled: bool = True):
        from omni_jax.train.events import EventWriter

        self.enabled = enabled
        if not enabled:
            return
        self.path = paths.join(workdir, "metrics.jsonl")
        if paths.exists(self.path):  # drop rows a killed run wrote after its last checkpoint
            rows = [ln + "\n" for ln in paths.read_text(self.path).splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= resume_step]
            paths.write_text(self.path, "".join(rows))
        self.f = paths.AppendFile(self.path)
        self.tb = EventWriter(paths.join(workdir, "tensorboard"))

    def write(self, row: dict):
        if not self.enabled:
            return
        self.f.write((json.dumps(row) + "\n").encode())
        self.f.flush()
        self.tb.scalars(row["step"], {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))})

    def close(self):
        if self.enabled:
            self.f.close()
            self.tb.close()


class Trainer:
    """One training run. `mesh`: a jax Mesh or a spec string ("data=2,expert=4"); None takes config.mesh.spec,
    and an empty spec trains on one device. The sharding rules preset is config.mesh.rules."""

    def __init__(self, cfg: ml_collections.ConfigDict, workdir: str, *, init_from: str | None = None, mesh=None,
                 progress: bool = True):
        self.cfg, self.workdir, self.progress = cfg, paths.resolve(workdir), progress
        self.data_cfg = _section(cfg, "data", D.DataConfig, ignore=("train_file", "eval_file"))
        self.optim_cfg = _section(cfg, "optim", TS.OptimConfig)
        self.loss_cfg = _section(cfg, "loss", TS.LossConfig)
        check_impl("moe", self.loss_cfg.moe_impl, flag="config.loss.moe_impl")
        check_impl("attention", self.loss_cfg.attention_impl, flag="config.loss.attention_impl")
        self.tc = cfg.train
        self.talker = talker_task(cfg)  # train.task="talker": omni_jax.train.talker hooks (None: thinker)
        spec, rules = mesh_config(cfg)
        self.rules = S.get_rules(rules)
        mesh = mesh if mesh is not None else spec or None
        if mesh is None and jax.process_count() > 1:  # one job over every device of every process, not N replicas
            mesh = "fsdp=-1"
            log.info("%d processes: training on one mesh fsdp=%d over all their devices (--mesh to choose)",
                     jax.process_count(), jax.device_count())
        self.mesh = S.make_mesh(mesh) if isinstance(mesh, str) else mesh
        if self.mesh is not None and self.mesh.size != jax.device_count() and jax.process_count() > 1:
            raise S.MeshError(f"the mesh covers {self.mesh.size} devices but the {jax.process_count()} processes of "
                              f"this job have {jax.device_count()}: a multi-process mesh must use every device")
        self.global_batch = self.data_cfg.batch_size  # data.batch_size is the global batch, over all processes
        self.rows = (0, self.global_batch)
        if self.mesh is not None:
            split = int(np.prod([self.mesh.shape[a] for a in BATCH_MESH_AXES]))
            if self.global_batch % split:
                raise TrainError(f"the global batch of {self.global_batch} examples (data.batch_size) does not "
                                 f"divide over the mesh's batch axes data x fsdp = {split}; choose a batch size that "
                                 f"is a multiple of {split}")
            self.rows = D.process_rows(batch_shardings(self.mesh, self.data_cfg)["input_ids"], self.global_batch)
        check_workdir(self.workdir)
        dist.check_same("training config", _job_config(cfg, self.workdir, init_from, self.mesh))
        self.local_dir = local_dir(self.workdir)
        self.train_file, self.eval_file = self._data_files()
        self.model, self.mcfg, tok_dir = build_model(cfg, init_from, self.mesh, self.rules)
        if self.talker is not None:
            self.talker.check_model(self.model)
        if tok_dir and paths.is_url(tok_dir):  # the tokenizer is read with plain file APIs: a local copy
            tok_dir = _local_side_files(tok_dir, os.path.join(self.local_dir, "tokenizer"))
        self.tok_dir = tok_dir or _write_tokenizer(os.path.join(self.local_dir, "tokenizer"), self.mcfg)
        from omni_jax.processing.tokenizer import Tokenizer

        self.tokenizer = Tokenizer.from_dir(self.tok_dir)
        self.patterns = TS.freeze_patterns(self.tc.freeze)
        self.graphdef, params, frozen = TS.split_trainable(self.model, self.patterns)
        self.tx = TS.make_optimizer(self.optim_cfg)
        self.schedule = TS.lr_schedule(self.optim_cfg)
        image_grid = D.batch_image_grid(dataclasses.replace(self.data_cfg, batch_size=self.global_batch))
        rng, step0 = jax.random.key_data(jax.random.key(self.tc.seed)), jnp.int32(0)
        if self.mesh is None:
            self.shardings = None
            self.state = {"params": params, "frozen": frozen, "opt_state": self.tx.init(params),
                          "rng": rng, "step": step0}
        else:
            self.shardings = self._state_shardings(params, frozen)
            sh = self.shardings
            params, frozen = jax.device_put(params, sh["params"]), jax.device_put(frozen, sh["frozen"])
            self.state = {"params": params, "frozen": frozen,
                          "opt_state": jax.jit(self.tx.init, out_shardings=sh["opt_state"])(params),
                          "rng": self._replicated(rng), "step": self._replicated(step0)}
        self.train_step, self.eval_step = TS.make_steps(self.graphdef, self.tx, self.loss_cfg, image_grid=image_grid,
                                                        shardings=self.shardings, mesh=self.mesh, rules=self.rules,
                                                        loss=None if self.talker is None else self.talker.loss(
                                                            image_grid=image_grid, moe_impl=self.loss_cfg.moe_impl))
        self.flops_per_token = 6.0 * active_params(params, self.mcfg)
        # peak_flops is per device: MFU divides this host's throughput by its devices' peak
        self.num_devices = 1 if self.mesh is None else len(self.mesh.local_devices)
        self.stop = dist.StopFlag()  # SIGTERM on any process: every process stops after the same step

    def _state_shardings(self, params, frozen) -> dict:
        mesh = self.mesh
        param_sh = S.named_shardings(params, mesh, self.rules)
        return {"params": param_sh, "frozen": S.named_shardings(frozen, mesh, self.rules),
                "opt_state": opt_state_shardings(self.tx, params, param_sh, mesh),
                "batch": batch_shardings(mesh, self.data_cfg, self.talker)}

    def _replicated(self, x):
        return x if self.mesh is None else jax.device_put(x, NamedSharding(self.mesh, P()))

    def _batch(self, batch: dict) -> dict:
        return _to_device(batch, None if self.shardings is None else self.shardings["batch"])

    def _data_files(self):
        d = self.cfg.data
        if self.cfg.toy.enabled and not d.train_file:
            from omni_jax.train.toy import write_toy_dataset

            tasks = tuple(t for t in self.cfg.toy.tasks.split(",") if t)
            train, evals = write_toy_dataset(os.path.join(self.local_dir, "toy_data"), self.cfg.toy.n_train,
                                             self.cfg.toy.n_eval, self.cfg.toy.seed, tasks,
                                             **({} if self.talker is None else self.talker.toy_options()))
            return train, evals if self.cfg.toy.n_eval else None  # toy.n_eval=0: no eval
        if not d.train_file:
            raise TrainError("config.data.train_file is empty (and config.toy.enabled is false)")
        for f in (d.train_file, d.eval_file):
            if f and (not paths.exists(f) or paths.isdir(f)):
                raise D.DataError(f"data file not found: {f}")
        return paths.resolve(d.train_file), paths.resolve(d.eval_file) if d.eval_file else None

    # -------------------------------------------------------------------------------------------- checkpoints

    def _manager(self):
        opts = ocp.CheckpointManagerOptions(max_to_keep=self.tc.keep_ckpts, create=True,
                                            enable_async_checkpointing=self.tc.async_checkpoint)
        return ocp.CheckpointManager(paths.join(self.workdir, "checkpoints"), options=opts)

    def _layout_file(self) -> str:
        return paths.join(self.workdir, "checkpoints", "omni_jax_layout.json")

    def _save(self, mngr, step: int, data_it, force: bool = False):
        from omni_jax.checkpoint.orbax_io import PARAM_LAYOUT

        if dist.is_primary() and not paths.exists(self._layout_file()):
            paths.makedirs(paths.join(self.workdir, "checkpoints"))
            paths.write_text(self._layout_file(), json.dumps({"param_layout": PARAM_LAYOUT}))
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(self.state),
                                                data=ocp.args.JsonSave(data_it.state())), force=force)

    def _restore(self, mngr, data_it) -> int:
        step = mngr.latest_step()
        if step is None:
            return 0
        from omni_jax.checkpoint.orbax_io import check_layout

        found = None
        if paths.exists(self._layout_file()):
            found = json.loads(paths.read_text(self._layout_file())).get("param_layout")
        check_layout(found, f"the checkpoints in {mngr.directory}")
        # Shapes, dtypes and shardings of the current (already placed) state: under a mesh every array is read
        # straight onto its shards, whatever mesh wrote the checkpoint.
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, self.state)
        from omni_jax.checkpoint.validate import restore_newest_intact

        step, got, skipped = restore_newest_intact(mngr, lambda s: mngr.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore())))
        self.skipped_steps = [s for s, _ in skipped]
        for s, why in skipped:
            log.warning("skipped broken checkpoint step %d (moved to %s.broken): %s", s, s, why)
        self.state = got["state"]
        data_it.restore(got["data"], batches=int(step))
        log.info("resumed from %s step %d", mngr.directory, step)
        return int(step)

    # ------------------------------------------------------------------------------------------------- loop

    def evaluate(self) -> dict:
        if not self.eval_file:
            return {}
        if self.talker is not None:
            return self.talker.evaluate(
                lambda b: jax.device_get(self.eval_step(self.state["params"], self.state["frozen"], self._batch(b))),
                self.eval_file, self.tokenizer, self.mcfg, self.data_cfg, self.tc.eval_max_examples or None,
                self.rows)
        tot_loss = tot_tok = em = n = 0.0
        for batch in D.eval_batches(self.eval_file, self.tokenizer, self.mcfg, self.data_cfg,
                                    self.tc.eval_max_examples or None, rows=self.rows):
            m = jax.device_get(self.eval_step(self.state["params"], self.state["frozen"], self._batch(batch)))
            tot_loss += float(m["ce_loss"]) * float(m["target_tokens"])
            tot_tok += float(m["target_tokens"])
            em += float(m["exact_match_count"])
            n += float(m["examples"])
        return {"eval_loss": tot_loss / max(tot_tok, 1.0), "eval_exact_match": em / max(n, 1.0),
                "eval_examples": int(n)}

    def _on_sigterm(self, signum, frame):
        log.warning("SIGTERM: saving a checkpoint after this step, then exiting")
        self.stop.request()

    def run(self) -> dict:
        tc = self.tc
        data_it = (D.TrainIterator if self.talker is None else self.talker.train_iterator)(
            self.train_file, self.tokenizer, self.mcfg, self.data_cfg, rows=self.rows)
        mngr = self._manager()
        start = self._restore(mngr, data_it)
        metrics = MetricsLog(self.workdir, start, enabled=dist.is_primary())
        old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        bar = None
        if self.progress and dist.is_primary():
            from tqdm import tqdm

            bar = tqdm(total=tc.steps, initial=start, desc="train", unit="step", dynamic_ncols=True)
        t0, t_start, tokens, step, last = time.time(), time.time(), 0, start, {}
        try:
            for step in range(start + 1, tc.steps + 1):
                host_batch = next(data_it)
                tokens += int(host_batch["valid"].sum())  # this process's tokens (tokens_per_s is per host)
                p, o, m = self.train_step(self.state["params"], self.state["frozen"], self.state["opt_state"],
                                          self._batch(host_batch))
                self.state.update(params=p, opt_state=o, step=self._replicated(jnp.int32(step)))
                if step % tc.log_every == 0 or step == tc.steps:
                    m = jax.device_get(m)
                    dt = max(time.time() - t0, 1e-9)
                    row = {"step": step, "loss": float(m["loss"]), "ce_loss": float(m["ce_loss"]),
                           "aux_loss": float(m["aux_loss"]), "z_loss": float(m["z_loss"]),
                           "grad_norm": float(m["grad_norm"]),
                           "learning_rate": float(self.schedule((step - 1) // self.optim_cfg.grad_accum)),
                           "tokens_per_s": tokens / dt, "bad_records": data_it.filter.bad}
                    if tc.peak_flops > 0:
                        row["mfu"] = self.flops_per_token * tokens / dt / (tc.peak_flops * self.num_devices)
                    if self.talker is not None:
                        row.update(self.talker.log_row(m))
                    metrics.write(row)
                    last = row
                    t0, tokens = time.time(), 0
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['loss']:.4f}")
                if tc.eval_every and step % tc.eval_every == 0 and step != tc.steps:
                    ev = self.evaluate()
                    if ev:
                        metrics.write({"step": step, **ev})
                if tc.ckpt_every and step % tc.ckpt_every == 0:
                    self._save(mngr, step, data_it)
                    if tc.debug_sigkill_at and step == tc.debug_sigkill_at:  # for the resume test only
                        mngr.wait_until_finished()
                        os.kill(os.getpid(), signal.SIGKILL)
                if tc.get("debug_sigterm_at", 0) and step == tc.debug_sigterm_at:  # preemption test only
                    os.kill(os.getpid(), signal.SIGTERM)
                if bar is not None:
                    bar.update(1)
                if self.stop.agreed(step):
                    self._save(mngr, step, data_it, force=True)
                    mngr.wait_until_finished()
                    return {"status": "preempted", "step": step, **last}
            if mngr.latest_step() != tc.steps and step == tc.steps:
                self._save(mngr, step, data_it, force=True)
            mngr.wait_until_finished()
            final = self.evaluate()
            if final:
                metrics.write({"step": step, **final})
            done = {"status": "done", "step": step, "wall_s": time.time() - t_start, **last, **final}
            if getattr(self, "skipped_steps", None):
                done["skipped_broken_steps"] = self.skipped_steps
            if tc.export:
                done["export"] = self.export(paths.join(self.workdir, "export"))
                if self.cfg.toy.enabled and self.talker is None and dist.is_primary():
                    from omni_jax.train.toy import write_example_question

                    qdir = self.local_dir if paths.is_url(self.workdir) else self.workdir  # written with plain files
                    q, answer = write_example_question(qdir, kind=self.cfg.toy.tasks.split(",")[0])
                    done.update(example_question=q, example_answer=answer)
            return done
        finally:
            signal.signal(signal.SIGTERM, old_handler)
            if bar is not None:
                bar.close()
            metrics.close()
            mngr.close()

    def merged_model(self):
        return nnx.merge(self.graphdef, self.state["params"], self.state["frozen"])

    def export(self, out: str):
        from omni_jax.checkpoint.orbax_io import save_orbax

        save_orbax(self.merged_model(), self.mcfg, out, copy_from=self.tok_dir, overwrite=True, sources=())
        return out


def train(config: str, workdir: str, overrides: list[str] = (), *, init_from: str | None = None,
          progress: bool = True, mesh: str | None = None, rules: str | None = None) -> dict:
    """Load a config file, apply overrides, run. `mesh` / `rules` (the CLI's --mesh / --rules) override
    config.mesh.spec / config.mesh.rules (a config without a mesh section gets one)."""
    cfg = apply_overrides(load_config_file(config), list(overrides))
    from omni_jax.cli_checks import check_train_config

    check_train_config(cfg)  # impossible numbers are refused before any model is built
    if mesh is not None or rules is not None:
        spec, preset = mesh_config(cfg)
        with cfg.unlocked():
            cfg.mesh = ml_collections.ConfigDict({"spec": spec if mesh is None else mesh,
                                                  "rules": preset if rules is None else rules})
    return Trainer(cfg, workdir, init_from=init_from, progress=progress).run()

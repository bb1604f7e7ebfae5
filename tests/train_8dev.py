"""Mesh training checks that need 8 devices: run by tests/test_train_mesh.py in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (pytest's process has already initialised jax with one).

    python tests/train_8dev.py WORKDIR        # prints one JSON object of measurements

The toy quick config on text-only data (no encoders in the graph: fast compiles; the encoders are frozen so
that they add no optimizer state), 4 steps with a router z-loss, on one device and on three meshes:
"data=2,expert=4" (Trainer API, with eval and export), "fsdp=4,tensor=2" (`omni-jax train --mesh --rules --init-from`)
and "expert=8" (parameters created on their shards; 2 steps, then a new Trainer resumes the Orbax checkpoint
onto the mesh shardings for steps 3-4); then the single-device run's step-2 checkpoint is resumed on expert=8.
Last, talker training (configs/toy.py:talker shrunk to 4 steps, thinker frozen) on one device and on
"data=2,expert=4" (stopped after step 2 and resumed in a new Trainer), with eval on both
(`python tests/train_8dev.py WORKDIR talker` runs only that section).
The assertions live in test_train_mesh.py.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
                                   "--xla_llvm_disable_expensive_passes=true")

import contextlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from omni_jax import cli  # noqa: E402
from omni_jax.kernels.moe import expert_parallel as EP  # noqa: E402
from omni_jax.train import loop as L  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs/toy.py:quick")
OVERRIDES = ["--config.toy.tasks=text", "--config.data.audio_slots=0", "--config.data.image_slots=0",
             "--config.data.seq_len=32", "--config.train.export=false", "--config.train.steps=4",
             "--config.train.ckpt_every=2", "--config.train.async_checkpoint=false", "--config.toy.n_eval=8",
             "--config.loss.router_z_loss_coef=0.01", r"--config.train.freeze=^thinker\.(audio_tower|visual)\."]
EXPERT = ("thinker", "model", "layers", 0, "mlp", "experts", "gate_proj")
EMBED = ("thinker", "model", "embed_tokens", "embedding")
TALKER_CONFIG = os.path.join(REPO, "configs/toy.py:talker")
TALKER_OVERRIDES = ["--config.train.steps=4", "--config.optim.total_steps=4", "--config.optim.warmup_steps=1",
                    "--config.toy.n_train=24", "--config.toy.n_eval=4", "--config.data.batch_size=4",
                    "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.ckpt_every=2",
                    "--config.train.export=false", "--config.train.async_checkpoint=false"]
TALKER_EXPERT = ("talker", "model", "layers", 0, "mlp", "experts", "gate_proj")


def _cfg(*extra):
    return L.apply_overrides(L.load_config_file(CONFIG), [*OVERRIDES, *extra])


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree.get_value() if hasattr(tree, "get_value") else tree


def _specs(tr) -> dict:
    """Sharding specs of an expert weight, the token embedding, and the expert weight's Adam moments."""
    mu = tr.state["opt_state"][1][0].mu  # chain(clip, adamw): adamw = chain(scale_by_adam, ...)
    return {"expert": str(_get(tr.state["params"], EXPERT).sharding.spec),
            "embed": str(_get(tr.state["params"], EMBED).sharding.spec),
            "expert_mu": str(_get(mu, EXPERT).sharding.spec),
            "num_devices": len(_get(tr.state["params"], EXPERT).sharding.device_set)}


def _rows(workdir) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]


def _summary(workdir) -> dict:
    rows = _rows(workdir)
    steps = [r for r in rows if "loss" in r]
    ev = [r["eval_loss"] for r in rows if "eval_loss" in r]
    return {"step": [r["step"] for r in steps], "loss": [r["loss"] for r in steps],
            "grad_norm": [r["grad_norm"] for r in steps], "z_loss": [r["z_loss"] for r in steps],
            "eval_loss": ev[-1] if ev else None}


EP_TRACES = [0]  # MoE layers traced on the expert-parallel path (sharding.activate with an expert axis)
_ep = EP.expert_ffn_ep


def _counting_ep(*args, **kwargs):
    EP_TRACES[0] += 1
    return _ep(*args, **kwargs)


EP.expert_ffn_ep = _counting_ep


def _ep_traces() -> int:
    n, EP_TRACES[0] = EP_TRACES[0], 0
    return n


def _no_eval(tr):
    tr.eval_file = None  # eval is compared on one mesh only (each eval step is one more compile)
    return tr


def talker(root: str) -> dict:
    """train.task=talker, 4 steps on one device and on data=2,expert=4 (parameters created on their shards from
    the same seed; the mesh run stops after step 2 and a new Trainer resumes its checkpoint for steps 3-4):
    per-step total / talker_ce / mtp_ce, the eval metrics after step 4, the talker expert weight's (and its Adam
    moment's) sharding, and how many MoE layers were traced expert-parallel."""
    out, _ = {}, _ep_traces()  # drop the count of earlier sections
    for name, mesh in (("none", None), ("data=2,expert=4", "data=2,expert=4")):
        wd = os.path.join(root, "talker_" + name.replace("=", "").replace(",", "_"))
        def cfg(*extra):  # a fresh config each time (overrides edit it in place)
            return L.apply_overrides(L.load_config_file(TALKER_CONFIG), [*TALKER_OVERRIDES, *extra])

        tr = L.Trainer(cfg() if mesh is None else cfg("--config.train.steps=2"), wd, mesh=mesh, progress=False)
        w = _get(tr.state["params"], TALKER_EXPERT)
        mu = _get(tr.state["opt_state"][1][0].mu, TALKER_EXPERT)
        r = {"expert": str(getattr(w.sharding, "spec", None)), "expert_mu": str(getattr(mu.sharding, "spec", None)),
             "num_devices": len(w.sharding.device_set)}
        if mesh is not None:
            r["batch_spec"] = {k: str(v.spec) for k, v in tr.shardings["batch"].items()
                               if k in ("talker_positions", "codec_codes", "positions")}
        res = tr.run()
        if mesh is not None:  # resume the step-2 checkpoint in a new Trainer on the same mesh
            tr = L.Trainer(cfg(), wd, mesh=mesh, progress=False)
            res = tr.run()
        rows = [x for x in _rows(wd) if "talker_ce" in x]
        r.update(step=[x["step"] for x in rows], **{k: [x[k] for x in rows] for k in ("loss", "talker_ce", "mtp_ce")},
                 status=res["status"], eval=tr.evaluate(), ep_traces=_ep_traces())
        out[name] = r
    return out


def main(root: str, only: str = "") -> dict:
    out, t0 = {}, time.time()
    # Identical compiled programs (the resumed expert=8 run) come from the persistent cache.
    jax.config.update("jax_compilation_cache_dir", os.path.join(root, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if only == "talker":
        t = time.time()
        return {"talker": talker(root), "talker_wall_s": time.time() - t}

    # One device (parameters created eagerly); its initial model is exported so that the meshes below can
    # start from it with --init-from (read straight onto the shards, no compiled init).
    wd = os.path.join(root, "none")
    tr = L.Trainer(_cfg(), wd, progress=False)
    init = tr.export(os.path.join(root, "init"))
    tr.run()
    out["none"] = {**_summary(wd), "ep_traces": _ep_traces()}

    # data=2,expert=4 through the Trainer API (mesh given as a spec string), with eval
    wd = os.path.join(root, "data2_expert4")
    tr = L.Trainer(_cfg(f"--config.model.init_from={init}", "--config.train.export=true"), wd,
                   mesh="data=2,expert=4", progress=False)
    out["data=2,expert=4"] = {**_specs(tr), "batch_spec": str(tr.shardings["batch"]["positions"].spec)}
    tr.run()
    out["data=2,expert=4"].update(_summary(wd), ep_traces=_ep_traces())
    # the export (written from sharded arrays) holds the trained weights
    from omni_jax.checkpoint.orbax_io import load_orbax

    exported, _ = load_orbax(os.path.join(wd, "export"))
    got = np.asarray(exported.thinker.model.layers[0].mlp.experts.gate_proj.get_value())
    trained = np.asarray(_get(tr.state["params"], EXPERT))
    out["data=2,expert=4"]["export_equal"] = bool(np.array_equal(got, trained))

    # fsdp=4,tensor=2 through the CLI (--mesh / --rules / --init-from); the Trainer is captured for its shardings
    wd = os.path.join(root, "fsdp4_tensor2")
    seen = []
    run = L.Trainer.run

    def spy(self):
        seen.append(_specs(_no_eval(self)))
        return run(self)

    L.Trainer.run = spy
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            rc = cli.main(["train", "--config", CONFIG, "--workdir", wd, "--no-progress", "--init-from", init,
                           *OVERRIDES, "--mesh", "fsdp=4,tensor=2", "--rules", "default"])
    finally:
        L.Trainer.run = run
    out["fsdp=4,tensor=2"] = {"rc": rc, **(seen[0] if seen else {}), **_summary(wd), "ep_traces": _ep_traces()}

    # expert=8 from config.mesh.spec, parameters created directly on their shards (sharding.create_sharded from
    # the same seed): 2 steps, then a fresh Trainer restores the step-2 Orbax checkpoint onto its shardings.
    wd = os.path.join(root, "expert8")
    _no_eval(L.Trainer(_cfg("--config.mesh.spec=expert=8", "--config.train.steps=2"), wd, progress=False)).run()
    tr = _no_eval(L.Trainer(_cfg("--config.mesh.spec=expert=8", f"--config.model.init_from={init}"), wd,
                            progress=False))
    res = tr.run()
    out["expert=8"] = {**_specs(tr), "status": res["status"], **_summary(wd), "ep_traces": _ep_traces()}

    # the single-device run's step-2 checkpoint restored onto the expert=8 shardings (steps 3-4 on the mesh)
    wd = os.path.join(root, "none_to_expert8")
    shutil.copytree(os.path.join(root, "none"), wd)
    shutil.rmtree(os.path.join(wd, "checkpoints", "4"))
    tr = _no_eval(L.Trainer(_cfg("--config.mesh.spec=expert=8", f"--config.model.init_from={init}"), wd,
                            progress=False))
    tr.run()
    out["none->expert=8"] = _summary(wd)

    # a batch that does not split over data x fsdp
    try:
        L.Trainer(_cfg("--config.mesh.spec=fsdp=8"), os.path.join(root, "bad"), progress=False)
        out["bad_batch_error"] = None
    except L.TrainError as e:
        out["bad_batch_error"] = str(e)
    t = time.time()
    out["talker"] = talker(root)
    out["talker_wall_s"] = time.time() - t
    out["wall_s"] = time.time() - t0
    return out


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.device_count()
    print(json.dumps(main(*sys.argv[1:3])))

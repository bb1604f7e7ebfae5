"""Import and export of Hugging Face checkpoint directories (config.json + safetensors shards + index).

Import builds the model abstractly (`nnx.eval_shape`), then streams tensors one at a time from memory-mapped
shards through the key table, so host memory peaks at about the model being built plus one tensor (a stacked
expert buffer at most). Export runs the same key table backwards and writes sharded safetensors with an index.
"""

from __future__ import annotations

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni_jax.checkpoint import keys as K
from omni_jax.checkpoint import safetensors_io as S
from omni_jax.checkpoint.assign import CheckpointError, Report, flat_params, get_value, load_tensors, route_tensors
from omni_jax.checkpoint.safe_write import atomic_dir
from omni_jax.config import ConfigError, OmniConfig
from omni_jax.models.omni import OmniModel

INDEX = "model.safetensors.index.json"
# Files copied alongside the weights on export (tokenizer, chat template, processor, generation settings).
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
              "added_tokens.json", "chat_template.jinja", "chat_template.json", "processor_config.json",
              "preprocessor_config.json", "video_preprocessor_config.json", "generation_config.json")


def shard_files(path: str) -> list[str]:
    """The safetensors files of an HF directory, checking that every shard named by the index exists."""
    if not os.path.isdir(path):
        raise CheckpointError(f"model directory not found: {path}")
    idx = os.path.join(path, INDEX)
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(idx):
        try:
            with open(idx, encoding="utf-8") as f:
                index = json.load(f)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{idx}: not a valid JSON index ({e})") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or \
                not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{idx} has no weight_map of tensor name -> file name")
        files = sorted(set(weight_map.values()))
        if os.path.exists(single):
            _check_single_matches_index(single, idx, weight_map)
        missing = [fn for fn in files if not os.path.exists(os.path.join(path, fn))]
        if missing:
            raise CheckpointError(f"{path}: missing shard file(s) named in {INDEX}: {', '.join(missing)}")
        return [os.path.join(path, fn) for fn in files]
    if os.path.exists(single):
        return [single]
    found = sorted(fn for fn in os.listdir(path) if fn.endswith(".safetensors"))
    if found:
        return [os.path.join(path, fn) for fn in found]
    raise CheckpointError(f"{path}: no model.safetensors, {INDEX} or *.safetensors files")


def _check_single_matches_index(single: str, idx: str, weight_map: dict) -> None:
    """A folder with both model.safetensors and an index is only valid when the index describes that file
    exactly; otherwise it mixes two checkpoints (e.g. an earlier sharded export left behind)."""
    header_keys = set(S.read_header(single)[0])
    if set(weight_map.values()) != {"model.safetensors"} or set(weight_map) != header_keys:
        raise CheckpointError(f"{os.path.dirname(single)} holds both {os.path.basename(single)} and {INDEX}, and "
                              f"they disagree (the folder mixes two checkpoints); remove the stale one")


def load_config(path: str) -> OmniConfig:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ConfigError(f"{path}: no config.json")
    return OmniConfig.from_hf(cfg_path)


def iter_checkpoint(path: str):
    for fn in shard_files(path):
        yield from S.iter_tensors(fn)


def load_hf(path: str, *, dtype=jnp.float32, parts: tuple[str, ...] | None = None, shardings=None,
            progress=None, mesh=None, rules="default") -> tuple[OmniModel, OmniConfig]:
    """Load an HF directory into an OmniModel with parameters of `dtype` (None: each tensor as stored).

    parts: which of ("thinker", "talker", "code2wav") to build (default: all the config has). Tensors of parts
    not built are skipped deliberately; anything else unmapped, missing or mis-shaped raises CheckpointError.
    mesh / rules: place every tensor at its sharding (omni_jax.sharding) as it is read; `shardings`
    ({our_path: Sharding}) overrides per parameter.
    """
    files = shard_files(path)
    cfg = load_config(path)
    model = nnx.eval_shape(lambda: OmniModel(cfg, dtype=dtype or jnp.float32, rngs=nnx.Rngs(0), parts=parts))
    if mesh is not None:
        from omni_jax import sharding

        sharding.check_model_fits(mesh, _moe_text_configs(model))
        shardings = {**sharding.path_shardings(model, mesh, sharding.get_rules(rules)), **(shardings or {})}
    report = load_tensors(model, (kv for fn in files for kv in S.iter_tensors(fn)), dtype=dtype,
                          shardings=shardings, skip_prefixes=model.skipped_prefixes(), progress=progress,
                          strict=False, as_stored=dtype is None)
    report.raise_if_bad(f"checkpoint {path}")
    return model, cfg


def _moe_text_configs(model: OmniModel):
    out = [("thinker", model.cfg.thinker_config.text_config)]
    if model.talker is not None:
        out.append(("talker", model.cfg.talker_config.text_config))
    return out


def export_items(model: nnx.Module, root: str = "", dtype=None):
    """Yield (hf_key, numpy array) for every parameter, through the key table run backwards."""
    rules = K.all_rules()
    pre = root + "." if root else ""
    for path, var in flat_params(model).items():
        full = pre + path
        for rule in rules:
            m = rule.ours_re.match(full)
            if m is None:
                continue
            tr = K.TRANSFORMS[rule.transform]
            if tr.to_hf is None:
                raise CheckpointError(f"no export transform for {full} (rule {rule.hf})")
            value = np.asarray(jax.device_get(get_value(var)))
            if dtype is not None:
                value = value.astype(dtype)
            groups = m.groupdict()
            stack = rule.stack_names
            if stack:
                for i in range(value.shape[0]):
                    yield rule.format_hf({**groups, stack[0]: i}), tr.to_hf(value[i])
            else:
                yield rule.format_hf(groups), tr.to_hf(value)
            break
        else:
            raise CheckpointError(f"parameter {full} has no rule in the key table (export)")


def save_hf(model: OmniModel, cfg: OmniConfig, out: str, *, dtype=None, max_shard_bytes: int = 4 << 30,
            copy_from: str | None = None, progress=None, overwrite: bool = False):
    """Write an HF directory: sharded safetensors + index, config.json, and side files copied from `copy_from`.

    Written into a temporary sibling and moved into place when complete (checkpoint/safe_write.py): a non-empty
    `out` is refused unless `overwrite`, and then replaced as a whole. dtype None keeps each tensor's dtype."""
    with atomic_dir(out, overwrite=overwrite, sources=(copy_from,)) as tmp:
        return write_hf_files(model, cfg, tmp, dtype=dtype, max_shard_bytes=max_shard_bytes, copy_from=copy_from,
                              progress=progress)


def write_hf_files(model: OmniModel, cfg: OmniConfig, out: str, *, dtype=None, max_shard_bytes: int = 4 << 30,
                   copy_from: str | None = None, progress=None):
    """The files of `save_hf`, written straight into the (new, empty) directory `out`."""
    _write_hf_dir(export_items(model, dtype=dtype), cfg, out, max_shard_bytes=max_shard_bytes, copy_from=copy_from,
                  progress=progress, parts=model.parts)
    return Report()


def convert_hf(src: str, out: str, *, dtype=None, max_shard_bytes: int = 4 << 30, progress=None,
               overwrite: bool = False):
    """HF directory -> HF directory without building the model (re-shard and/or cast; dtype None keeps each
    tensor's dtype). Every tensor is checked against the abstract model through the key table (names, shapes,
    duplicates, missing: the checks of `load_hf`), read into its own buffer (no memory map) and written, so host
    memory holds the output shard being filled plus one tensor. Written as `save_hf` (atomic, --overwrite)."""
    files = shard_files(src)
    cfg = load_config(src)
    model = nnx.eval_shape(lambda: OmniModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    report = Report()
    routed = route_tensors(flat_params(model), (kv for fn in files for kv in S.iter_tensors(fn, copy=True)), report,
                           skip_prefixes=model.skipped_prefixes())
    items = ((key, value if dtype is None else value.astype(dtype)) for key, _path, _idx, _tr, value in routed)
    with atomic_dir(out, overwrite=overwrite, sources=(src,)) as tmp:
        _write_hf_dir(items, cfg, tmp, max_shard_bytes=max_shard_bytes, copy_from=src, progress=progress,
                      parts=model.parts, before_finish=lambda: report.raise_if_bad(f"checkpoint {src}"))


def _write_hf_dir(items, cfg: OmniConfig, out: str, *, max_shard_bytes: int, copy_from: str | None, progress,
                  parts, before_finish=None):
    """Write (hf_key, array) items as shards (+ index), config.json (dtype: the one holding most bytes) and the
    side files of `copy_from`. Shards are written under temporary names and renamed once their count is known."""
    os.makedirs(out, exist_ok=True)
    dtypes: dict[str, int] = {}
    shard, shard_bytes, total = {}, 0, 0
    written: list[tuple[str, list[str]]] = []  # (temporary file name, keys)

    def flush():
        nonlocal shard, shard_bytes
        name = f"shard-{len(written):05d}.tmp"
        S.write_file(os.path.join(out, name), shard, {"format": "pt"})
        written.append((name, list(shard)))
        shard, shard_bytes = {}, 0

    for key, value in items:
        if shard and shard_bytes + value.nbytes > max_shard_bytes:
            flush()
        shard[key] = value
        shard_bytes += value.nbytes
        dtypes[value.dtype.name] = dtypes.get(value.dtype.name, 0) + value.nbytes
        total += value.nbytes
        if progress is not None:
            progress(key)
    if before_finish is not None:
        before_finish()
    if shard:
        flush()
    n = len(written)
    weight_map = {}
    for i, (tmp, keys) in enumerate(written):
        final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(out, tmp), os.path.join(out, final))
        for k in keys:
            weight_map[k] = final
    if n > 1:
        with open(os.path.join(out, INDEX), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f,
                      indent=2)
    hf_cfg = cfg.to_hf()
    if dtypes:  # the dtype holding most bytes (transformers' config has one dtype)
        hf_cfg["torch_dtype"] = hf_cfg["dtype"] = max(dtypes, key=dtypes.get)
    if "talker" not in parts:
        hf_cfg["enable_audio_output"] = False
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2)
    if copy_from:
        for fn in SIDE_FILES:
            src = os.path.join(copy_from, fn)
            if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out, fn)):
                shutil.copy(src, os.path.join(out, fn))

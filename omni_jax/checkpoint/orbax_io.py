"""Orbax save/restore of an OmniModel's parameters (all Orbax calls live here).

Layout of a converted directory: `config.json` + tokenizer/processor side files (as in an HF directory) and
`params/` (an Orbax PyTree checkpoint of the parameter state). `is_orbax_dir` tells the two formats apart.
Directories may be URLs (`gs://...`, omni_jax.paths). In a multi-process job every process calls `save_orbax`
(each writes its shards); the JSON and side files are written by process 0.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from omni_jax import paths
from omni_jax.checkpoint.assign import CheckpointError
from omni_jax.checkpoint.validate import BrokenCheckpointError, check_pytree_dir, restore_errors, short_reason
from omni_jax.config import OmniConfig
from omni_jax.models.omni import OmniModel

PARAMS = "params"
META = "omni_jax.json"
# Parameter layout of omni_jax's Orbax checkpoints (converted directories and training checkpoints).
# 1: expert weights [E, in, out] (until 2026-11-28); 2: [E, out, in], torch's Linear layout (gate/up [E, I, H],
# down [E, H, I]). A layout-1 checkpoint can have the same shapes (square experts), so it is refused by version.
PARAM_LAYOUT = 2


def check_layout(found, where: str):
    """Refuse a checkpoint written with another parameter layout (a clear error instead of wrong weights)."""
    found = 1 if found is None else int(found)
    if found != PARAM_LAYOUT:
        raise CheckpointError(
            f"{where} was written by an omni_jax with parameter layout {found} (expert weights [E, in, out]); "
            f"this version uses layout {PARAM_LAYOUT} ([E, out, in], as the HF checkpoints). Convert the HF "
            f"directory again (omni-jax convert --to orbax), or export the old checkpoint to HF with the omni_jax "
            f"that wrote it; training workdirs must start afresh")


def is_orbax_dir(path: str) -> bool:
    return paths.isdir(paths.join(path, PARAMS)) and paths.exists(paths.join(path, META))


def save_orbax(model: OmniModel, cfg: OmniConfig, out: str, *, copy_from: str | None = None,
               overwrite: bool = False, sources=None):
    """Write a converted directory (see the module docstring) with each parameter in its own dtype.

    One process, local `out`: written into a temporary sibling and moved into place when complete
    (checkpoint/safe_write.py): a non-empty `out` is refused unless `overwrite`, and then replaced as a whole. `out`
    may not overlap `sources` (default: copy_from); the trainer's export passes () as its model is in memory
    (re-exporting over --init-from is fine). Several processes, or a URL: every process writes its own shards into
    `out` through Orbax's collective save (one temporary folder per process would split the export), and process 0
    writes the JSON and side files."""
    if jax.process_count() == 1 and not paths.is_url(out):
        from omni_jax.checkpoint.safe_write import atomic_dir

        with atomic_dir(out, overwrite=overwrite, sources=(copy_from,) if sources is None else sources) as tmp:
            _write_orbax_files(model, cfg, tmp, copy_from)
        return
    out = paths.resolve(out)
    paths.makedirs(out)
    _write_orbax_files(model, cfg, out, copy_from)


def _write_orbax_files(model: OmniModel, cfg: OmniConfig, out: str, copy_from: str | None):
    state = nnx.state(model, nnx.Param)
    with ocp.PyTreeCheckpointer() as ckptr:  # force: replaces an earlier export (Orbax removes it on process 0)
        ckptr.save(paths.join(out, PARAMS), nnx.to_pure_dict(state), force=True)
    if jax.process_index() != 0:
        return
    nbytes: dict[str, int] = {}
    for leaf in jax.tree.leaves(state):
        nbytes[str(leaf.dtype)] = nbytes.get(str(leaf.dtype), 0) + leaf.size * leaf.dtype.itemsize
    dtype = max(nbytes, key=nbytes.get)  # the dtype holding most bytes; each array keeps its own
    hf_cfg = cfg.to_hf()
    hf_cfg["torch_dtype"] = hf_cfg["dtype"] = dtype
    paths.write_text(paths.join(out, "config.json"), json.dumps(hf_cfg, indent=2))
    paths.write_text(paths.join(out, META), json.dumps({"format": "omni_jax-orbax", "parts": list(model.parts),
                                                        "param_dtype": dtype, "param_dtypes": sorted(nbytes),
                                                        "param_layout": PARAM_LAYOUT}))
    if copy_from:
        from omni_jax.checkpoint.hf import SIDE_FILES

        for fn in SIDE_FILES:
            src = paths.join(copy_from, fn)
            if paths.exists(src):
                paths.path(src).copy(paths.join(out, fn), overwrite=True)


def load_orbax(path: str, *, dtype=None, parts: tuple[str, ...] | None = None, mesh=None, rules="default"):
    """Restore (model, cfg). dtype defaults to the saved parameter dtype; parts must be a subset of the saved.

    With a mesh every array is restored directly at its sharding (omni_jax.sharding rules): tensorstore reads
    only the slices this process's devices hold, so no host or device ever holds the whole model."""
    path = paths.resolve(path)
    if not is_orbax_dir(path):
        raise CheckpointError(f"{path} is not an omni_jax Orbax checkpoint (no {PARAMS}/ and {META})")
    try:
        meta = json.loads(paths.read_text(paths.join(path, META)))
        if not isinstance(meta, dict) or not isinstance(meta.get("parts"), list):
            raise ValueError("no list of parts")
    except ValueError as e:
        raise BrokenCheckpointError(f"{paths.join(path, META)}: unreadable ({short_reason(e)})") from e
    check_layout(meta.get("param_layout"), path)
    if not paths.is_url(path):
        check_pytree_dir(paths.join(path, PARAMS))
    cfg_path = paths.join(path, "config.json")
    cfg = OmniConfig.from_hf(json.loads(paths.read_text(cfg_path)) if paths.is_url(path) else cfg_path)
    saved_parts = tuple(meta["parts"])
    parts = saved_parts if parts is None else tuple(parts)
    if not set(parts) <= set(saved_parts):
        raise CheckpointError(f"{path} holds parts {saved_parts}; asked for {parts}")
    as_stored = dtype is None
    dtype = jnp.dtype(dtype or meta.get("param_dtype", "float32"))
    abstract = nnx.eval_shape(lambda: OmniModel(cfg, dtype=dtype, rngs=nnx.Rngs(0), parts=parts))
    graphdef, abs_state = nnx.split(abstract)
    # Restore only the parts asked for: Orbax reads the subtree named by the target and nothing else.
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nnx.to_pure_dict(abs_state))
    if as_stored and len(meta.get("param_dtypes", ())) > 1:  # mixed dtypes: each array as saved
        target = _stored_dtypes(paths.join(path, PARAMS), target)
    if mesh is not None:
        from omni_jax import sharding

        sharding.check_model_fits(mesh, [("thinker", cfg.thinker_config.text_config)]
                                  + ([("talker", cfg.talker_config.text_config)] if "talker" in parts else []))
        where = nnx.to_pure_dict(sharding.named_shardings(abs_state, mesh, sharding.get_rules(rules)))
    else:
        single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        where = jax.tree.map(lambda _: single, target)
    with ocp.PyTreeCheckpointer() as ckptr, restore_errors(paths.join(path, PARAMS)):
        restore_args = jax.tree.map(lambda x, sh: ocp.ArrayRestoreArgs(dtype=x.dtype, sharding=sh), target, where)
        extra = {"partial_restore": True} if parts != saved_parts else {}
        restored = ckptr.restore(paths.join(path, PARAMS),
                                 args=ocp.args.PyTreeRestore(target, restore_args=restore_args, **extra))
    nnx.replace_by_pure_dict(abs_state, restored)
    return nnx.merge(graphdef, abs_state), cfg


def _stored_dtypes(params_dir: str, target):
    """`target` (a tree of ShapeDtypeStructs) with each array's dtype as stored in the checkpoint."""
    with ocp.PyTreeCheckpointer() as ckptr, restore_errors(params_dir):
        stored = ckptr.metadata(params_dir).tree

    def pick(path, x):
        node = stored
        for k in path:
            node = node.get(k.key) if isinstance(node, dict) else None
        return jax.ShapeDtypeStruct(x.shape, node.dtype) if getattr(node, "dtype", None) is not None else x

    return jax.tree_util.tree_map_with_path(pick, target)

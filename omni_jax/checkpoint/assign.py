"""Stream HF-named tensors into an (abstract or concrete) NNX model through the key table.

Used by the directory loader (checkpoint/hf.py) and directly by per-part parity tests:

    load_tensors(module, {hf_key: np_array, ...}, root="thinker.audio_tower")

Each tensor is shape-checked against the target before it is transformed; per-item tensors (experts) fill
slices of one preallocated buffer that becomes a device array as soon as its last slice arrives, so peak host
memory is the model being built plus one stacked buffer. Problems are collected and raised together.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni_jax.checkpoint import keys as K
from omni_jax.errors import OmniJaxError


class CheckpointError(OmniJaxError):
    """A checkpoint that does not match the model: every problem is listed in the message."""


@dataclasses.dataclass
class Report:
    missing: list[str] = dataclasses.field(default_factory=list)
    unexpected: list[str] = dataclasses.field(default_factory=list)
    mismatched: list[str] = dataclasses.field(default_factory=list)
    duplicate: list[str] = dataclasses.field(default_factory=list)

    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched or self.duplicate)

    def raise_if_bad(self, where: str = "checkpoint"):
        if self.ok():
            return
        lines = [f"{where} does not match the model:"]
        for name, items in (("missing (model weights with no tensor in the checkpoint)", self.missing),
                            ("unexpected (checkpoint tensors the model has no place for)", self.unexpected),
                            ("shape mismatch", self.mismatched), ("duplicate", self.duplicate)):
            if items:
                lines.append(f"  {name}: {len(items)}")
                lines.extend(f"    {x}" for x in items[:50])
                if len(items) > 50:
                    lines.append(f"    ... and {len(items) - 50} more")
        raise CheckpointError("\n".join(lines))


def flat_params(model: nnx.Module) -> dict[str, nnx.Variable]:
    state = nnx.state(model, nnx.Param)
    return {".".join(str(p) for p in path): v for path, v in nnx.to_flat_state(state)}


def get_value(var):
    return var.get_value() if hasattr(var, "get_value") else var.value


def set_value(var, value):
    if hasattr(var, "set_value"):
        var.set_value(value)
    else:
        var.value = value


def _target_shape(var) -> tuple:
    return tuple(get_value(var).shape)


def route_tensors(params: dict, tensors: Iterable[tuple[str, np.ndarray]], report: Report, *, root: str = "",
                  rules=None, skip_prefixes: tuple[str, ...] = ()):
    """Match HF tensors to parameters ({our_path: Variable}, e.g. of an `nnx.eval_shape` model) through the key
    table, checking names, shapes and duplicates; nothing is materialised here.

    Yields (canonical hf_key, our_path, item index for stacked (expert) parameters or None, transform, value).
    Problems go to `report`; once the input is exhausted every parameter (or stacked item) that no tensor filled is
    in report.missing."""
    pre = root + "." if root else ""
    seen: dict[str, set] = {}
    for key, value in tensors:
        key = K.canonical_hf_key(key)
        if any(key.startswith(p) for p in skip_prefixes):
            continue
        fused = K.split_fused_experts(key, np.asarray(value))
        items = fused.items() if fused is not None else [(key, value)]
        for key, value in items:
            rule, groups = K.match(key, rules)
            if rule is None:
                report.unexpected.append(key)
                continue
            path = rule.format_ours(groups)
            if pre:
                if not path.startswith(pre):
                    report.unexpected.append(key)
                    continue
                path = path[len(pre):]
            if path not in params:
                report.unexpected.append(f"{key} (-> {path})")
                continue
            tr = K.TRANSFORMS[rule.transform]
            value = np.asarray(value)
            tshape = _target_shape(params[path])
            stack = rule.stack_names
            got = seen.setdefault(path, set())
            if not stack:
                if got:
                    report.duplicate.append(key)
                    continue
                if tr.jax_shape(value.shape) != tshape:
                    report.mismatched.append(f"{key}: checkpoint {tuple(value.shape)} -> {tr.jax_shape(value.shape)}"
                                             f", model {path} expects {tshape}")
                    continue
                got.add(None)
                yield key, path, None, tr, value
            else:
                idx = int(groups[stack[0]])
                if tr.jax_shape(value.shape) != tshape[1:] or not 0 <= idx < tshape[0]:
                    report.mismatched.append(f"{key}: checkpoint {tuple(value.shape)} (item {idx}), model {path} "
                                             f"expects {tshape[0]} items of {tshape[1:]}")
                    continue
                if idx in got:
                    report.duplicate.append(key)
                    continue
                got.add(idx)
                yield key, path, idx, tr, value
    for path, var in params.items():
        got = seen.get(path)
        if not got:
            report.missing.append(path)
        elif None not in got and len(got) < _target_shape(var)[0]:
            n = _target_shape(var)[0]
            report.missing.append(f"{path}: items {sorted(set(range(n)) - got)[:10]} of {n}")


def load_tensors(model: nnx.Module, tensors: Iterable[tuple[str, np.ndarray]] | dict, *, root: str = "",
                 dtype=None, rules=None, shardings: dict | None = None, skip_prefixes: tuple[str, ...] = (),
                 progress=None, strict: bool = True, as_stored: bool = False) -> Report:
    """Assign HF tensors to `model` in place (works on an `nnx.eval_shape` model too).

    root: the HF-path prefix this module corresponds to ("" for the whole omni model).
    dtype: cast every parameter to this dtype (default: the model's parameter dtype); as_stored: keep each
    tensor's dtype from the checkpoint instead.
    shardings: optional {our_path: jax.sharding.Sharding} to place each finished tensor directly.
    skip_prefixes: HF key prefixes that are deliberately not loaded (e.g. "talker." for a thinker-only load).
    """
    if isinstance(tensors, dict):
        tensors = tensors.items()
    params = flat_params(model)
    report = Report()
    done: dict[str, object] = {}
    buffers: dict[str, tuple[np.ndarray, list]] = {}

    def finish(path, arr):
        var = params[path]
        target_dtype = arr.dtype if as_stored else (dtype or get_value(var).dtype)
        if shardings and path in shardings:
            # Each device (and so each host) materialises only its own shard of the tensor.
            value = jax.make_array_from_callback(
                arr.shape, shardings[path], lambda index: np.asarray(arr[index]).astype(target_dtype))
        else:
            value = jnp.asarray(arr, dtype=target_dtype)
        done[path] = value

    for key, path, idx, tr, value in route_tensors(params, tensors, report, root=root, rules=rules,
                                                   skip_prefixes=skip_prefixes):
        if idx is None:
            finish(path, tr.to_jax(value))
        else:
            tshape = _target_shape(params[path])
            buf, count = buffers.get(path, (None, None))
            if buf is None:
                buf, count = np.empty(tshape, dtype=value.dtype), [0]
                buffers[path] = (buf, count)
            buf[idx] = tr.to_jax(value)
            count[0] += 1
            if count[0] == tshape[0]:
                finish(path, buf)
                del buffers[path]
        if progress is not None:
            progress(key)
    if strict:
        report.raise_if_bad()
    # Write the values into the model (replacing abstract ShapeDtypeStructs where the model was abstract).
    for path, value in done.items():
        set_value(params[path], value)
    return report

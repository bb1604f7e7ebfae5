"""Per-device memory of a model on a mesh, computed from shapes alone (`omni-jax plan`): size a pod before
renting it.

The model is built with `nnx.eval_shape` (nothing is allocated), each parameter's sharding comes from the same
rules table the real run uses (omni_jax/sharding.py), and a device's share of a tensor is its shape divided by
the mesh axes that split it. Optional extras: AdamW state (two fp32 moments per parameter, sharded like the
parameter) and the thinker's KV cache for a batch and length (layers x 2 x [B, S, KV heads, head_dim]).
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni_jax import sharding as S
from omni_jax.config import OmniConfig
from omni_jax.errors import OmniJaxError

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
OPTIMIZERS = {"adamw": 2}  # fp32 moments per parameter


_ABSTRACT: dict = {}


class PlanError(OmniJaxError):
    """A plan request that cannot be computed (unknown dtype or optimizer, bad mesh)."""


@dataclasses.dataclass
class Row:
    name: str
    params: int = 0  # element count
    total_bytes: int = 0
    device_bytes: int = 0  # bytes one device holds


@dataclasses.dataclass
class Plan:
    mesh: dict[str, int]
    rules: str
    dtype: str
    rows: list[Row]
    optimizer: str | None = None
    optimizer_device_bytes: int = 0
    kv_cache: tuple[int, int] | None = None  # (batch, length)
    kv_cache_device_bytes: int = 0

    @property
    def num_devices(self) -> int:
        return math.prod(self.mesh.values())

    @property
    def params(self) -> int:
        return sum(r.params for r in self.rows)

    @property
    def param_device_bytes(self) -> int:
        return sum(r.device_bytes for r in self.rows)

    @property
    def device_bytes(self) -> int:
        return self.param_device_bytes + self.optimizer_device_bytes + self.kv_cache_device_bytes

    def to_json(self) -> dict:
        return {"mesh": self.mesh, "num_devices": self.num_devices, "rules": self.rules, "dtype": self.dtype,
                "params": self.params, "param_bytes_per_device": self.param_device_bytes,
                "optimizer": self.optimizer, "optimizer_bytes_per_device": self.optimizer_device_bytes,
                "kv_cache": self.kv_cache, "kv_cache_bytes_per_device": self.kv_cache_device_bytes,
                "total_bytes_per_device": self.device_bytes,
                "parts": [dataclasses.asdict(r) for r in self.rows]}


def mesh_sizes(spec: str, devices: int | None = None) -> dict[str, int]:
    """Axis sizes of a mesh spec; without `devices` the spec must have no -1 (its product is the device count)."""
    if devices is None:
        sizes = [p.partition("=")[2].strip() for p in spec.split(",")]
        if "-1" in sizes:
            raise PlanError(f"mesh spec {spec!r} uses -1: give the device count (--devices N)")
        try:
            devices = math.prod(int(x) for x in sizes)
        except ValueError:
            devices = 0  # let parse_mesh_spec name the bad entry
    return S.parse_mesh_spec(spec, devices)


def _group(path: tuple) -> str:
    parts = [str(p) for p in path]
    if parts[0] == "thinker" and parts[1] == "model":
        return "thinker.model.experts" if "experts" in parts else "thinker.model (dense)"
    return ".".join(parts[:2]) if parts[0] == "thinker" else parts[0]


def device_elements(shape, spec, sizes: dict[str, int]) -> int:
    """Elements of one device's shard of a tensor of `shape` split as `spec` (uneven splits: the largest shard)."""
    n = 1
    for d, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else entry
        n *= -(-d // math.prod(sizes[a] for a in axes))
    return n


def plan(cfg: OmniConfig, sizes: dict[str, int], *, rules: str = "default", dtype: str = "bfloat16",
         parts: tuple[str, ...] | None = None, optimizer: str | None = None, batch: int = 0,
         seq_len: int = 0) -> Plan:
    if dtype not in DTYPE_BYTES:
        raise PlanError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_BYTES)}")
    if optimizer is not None and optimizer not in OPTIMIZERS:
        raise PlanError(f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
    table = S.get_rules(rules)
    mesh = S.abstract_mesh(sizes)
    from omni_jax.models.omni import OmniModel

    text_cfgs = [("thinker", cfg.thinker_config.text_config)]
    key = (json.dumps(cfg.to_hf(), sort_keys=True, default=str), dtype, parts)
    if key not in _ABSTRACT:  # tracing a full-size model takes seconds: keep the (shape-only) result
        _ABSTRACT.clear()
        _ABSTRACT[key] = nnx.eval_shape(lambda: OmniModel(cfg, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0),
                                                          parts=parts))
    model = _ABSTRACT[key]
    if model.talker is not None:
        text_cfgs.append(("talker", cfg.talker_config.text_config))
    S.check_model_fits(mesh, text_cfgs)
    itemsize = DTYPE_BYTES[dtype]
    rows: dict[str, Row] = {}
    opt_elems = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        shape = tuple(var.get_value().shape)
        spec = S.logical_to_spec(var.get_metadata().get("logical_axes"), table, mesh, shape)
        elems = device_elements(shape, spec, sizes)
        row = rows.setdefault(_group(path), Row(_group(path)))
        count = int(np.prod(shape))
        row.params += count
        row.total_bytes += count * itemsize
        row.device_bytes += elems * itemsize
        opt_elems += elems
    out = Plan(dict(sizes), rules if isinstance(rules, str) else "custom", dtype, list(rows.values()))
    if optimizer is not None:
        out.optimizer = optimizer
        out.optimizer_device_bytes = OPTIMIZERS[optimizer] * 4 * opt_elems
    if batch and seq_len:
        t = cfg.thinker_config.text_config
        shape = (batch, seq_len, t.num_key_value_heads, t.head_dim)
        spec = S.logical_to_spec(("batch", "seq", "kv_heads", "head_dim"), table, mesh, shape)
        out.kv_cache = (batch, seq_len)
        out.kv_cache_device_bytes = 2 * t.num_hidden_layers * device_elements(shape, spec, sizes) * itemsize
    return out


def _gib(n: int) -> str:
    return f"{n / 2**30:9.3f} GiB"


def format_plan(p: Plan) -> str:
    mesh = ",".join(f"{a}={s}" for a, s in p.mesh.items())
    lines = [f"mesh {mesh} ({p.num_devices} devices), rules {p.rules}, parameters in {p.dtype}",
             f"{'part':28s} {'parameters':>15s} {'total':>13s} {'per device':>13s}"]
    for r in p.rows:
        lines.append(f"{r.name:28s} {r.params:15,d} {_gib(r.total_bytes)} {_gib(r.device_bytes)}")
    lines.append(f"{'parameters':28s} {p.params:15,d} {_gib(sum(r.total_bytes for r in p.rows))} "
                 f"{_gib(p.param_device_bytes)}")
    if p.optimizer:
        lines.append(f"{p.optimizer + ' state (fp32 m, v)':28s} {'':15s} {'':13s} {_gib(p.optimizer_device_bytes)}")
    if p.kv_cache:
        b, s = p.kv_cache
        lines.append(f"{f'KV cache (batch {b}, len {s})':28s} {'':15s} {'':13s} {_gib(p.kv_cache_device_bytes)}")
    lines.append(f"{'total per device':28s} {'':15s} {'':13s} {_gib(p.device_bytes)}")
    return "\n".join(lines)

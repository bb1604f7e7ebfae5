"""Logical axis names -> mesh axes: the one table that decides how every weight and activation is sharded.

Every weight names its logical axes once, where it is created (`layers.param`). A strategy (FSDP, expert
parallel, tensor parallel) is a choice of rules below; changing strategy never touches model code.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

# Logical axes used by omni_jax weights and activations.
LOGICAL_AXES = (
    "batch", "seq", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "experts", "expert_embed",
    "expert_mlp", "norm", "conv_in", "conv_out", "kernel", "codebooks",
)

# Default rules: (logical axis, mesh axis or tuple of mesh axes or None). Mesh axes that a mesh lacks are dropped.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp", "expert")),
    ("seq", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("experts", "expert"),
    ("expert_embed", "fsdp"),
    ("expert_mlp", "tensor"),
    ("norm", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("kernel", None),
    ("codebooks", None),
)


def logical_to_spec(axes: tuple[str | None, ...] | None, rules=DEFAULT_RULES, mesh=None) -> P:
    """Map logical axis names to a PartitionSpec. A mesh axis is used at most once per spec."""
    if axes is None:
        return P()
    table = dict(rules)
    mesh_axes = set(mesh.axis_names) if mesh is not None else None
    used: set[str] = set()
    out = []
    for name in axes:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; known: {sorted(table)}")
        target = table[name]
        if target is None:
            out.append(None)
            continue
        cand = (target,) if isinstance(target, str) else tuple(target)
        keep = tuple(a for a in cand if (mesh_axes is None or a in mesh_axes) and a not in used
                     and (mesh is None or mesh.shape[a] > 1))
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else keep)
    return P(*out)


def param_specs(state: nnx.State, rules=DEFAULT_RULES, mesh=None):
    """PartitionSpecs for every variable of `state`, from the `logical_axes` metadata set at creation."""

    def one(v):
        axes = v.get_metadata().get("logical_axes") if isinstance(v, nnx.Variable) else None
        return logical_to_spec(axes, rules, mesh)

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def named_shardings(state: nnx.State, mesh, rules=DEFAULT_RULES):
    specs = param_specs(state, rules, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))

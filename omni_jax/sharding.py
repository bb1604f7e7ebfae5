"""Logical axis names -> mesh axes: the one table that decides how every weight and activation is sharded.

Every weight names its logical axes once, where it is created (`layers.param`). A strategy (FSDP, expert
parallel, tensor parallel) is a choice of rules below; changing strategy never touches model code.

    mesh = make_mesh("data=2,expert=4")              # or "fsdp=-1,tensor=2": -1 takes the remaining devices
    with activate(mesh, rules=RULE_PRESETS["default"]):
        ...                                          # jit-traced code sees the mesh: MoE layers dispatch experts
                                                     # over `expert`, `constrain` pins activations

Meshes always have the four axes of MESH_AXES in that order (size 1 where the spec leaves one out): `tensor` is
innermost (the devices that talk most sit next to each other), `data` outermost (across slices on a pod).
A rule naming a mesh axis of size 1, or one that does not divide the dimension, leaves that dimension whole.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from omni_jax.errors import OmniJaxError

# Logical axes used by omni_jax weights and activations.
LOGICAL_AXES = (
    "batch", "seq", "vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "experts", "expert_embed",
    "expert_mlp", "norm", "conv_in", "conv_out", "kernel", "codebooks",
)

# Mesh axes, outermost first.
MESH_AXES = ("data", "fsdp", "expert", "tensor")

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]

# Default rules: (logical axis, mesh axis or tuple of mesh axes or None). Every strategy at once; on a mesh
# that lacks an axis (size 1) its entries drop out, so "expert=8" is pure EP, "fsdp=8" pure FSDP, and so on.
DEFAULT_RULES: Rules = (
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


def _override(base: Rules, **changes) -> Rules:
    return tuple((k, changes.get(k, v)) for k, v in base)


# Presets: alternative tables. Each uses only the mesh axes it names; others act as extra data parallelism
# only where "batch" lists them.
RULE_PRESETS: dict[str, Rules] = {
    "default": DEFAULT_RULES,
    # ZeRO-3: every large weight split over `fsdp` along its model dimension; experts kept whole per device.
    "fsdp": _override(DEFAULT_RULES, batch=("data", "fsdp"), vocab=None, heads=None, kv_heads=None, mlp=None,
                      experts=None, expert_mlp=None, conv_out=None),
    # FSDP for dense weights, experts split over `expert` (and their hidden dim over `fsdp`); no tensor axis.
    "fsdp_ep": _override(DEFAULT_RULES, vocab=None, heads=None, kv_heads=None, mlp=None, expert_mlp=None,
                         conv_out=None),
    # Experts over `expert`, Megatron-style tensor parallelism over `tensor`; dense weights not FSDP-split.
    "ep_tp": _override(DEFAULT_RULES, batch=("data", "expert"), embed=None, expert_embed=None),
}


class MeshError(OmniJaxError):
    """A mesh spec that cannot be built on these devices, or a mesh that does not fit the model."""


# ---------------------------------------------------------------------------------------------------------------
# Meshes


def parse_mesh_spec(spec: str, num_devices: int) -> dict[str, int]:
    """`"data=2,expert=-1"` -> {"data": 2, "fsdp": 1, "expert": num_devices // 2, "tensor": 1}.

    At most one axis may be -1 (it takes the devices the others leave); the product must equal num_devices.
    """
    sizes: dict[str, int] = {}
    spec = (spec or "").strip()
    if not spec:
        raise MeshError(f"empty mesh spec; write e.g. 'data=2,expert=4' with axes from {', '.join(MESH_AXES)}")
    for item in spec.split(","):
        name, sep, value = item.strip().partition("=")
        name = name.strip()
        if not sep:
            raise MeshError(f"mesh spec {spec!r}: {item.strip()!r} is not AXIS=SIZE")
        if name not in MESH_AXES:
            raise MeshError(f"mesh spec {spec!r}: unknown axis {name!r}; axes are {', '.join(MESH_AXES)}")
        if name in sizes:
            raise MeshError(f"mesh spec {spec!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise MeshError(f"mesh spec {spec!r}: size of {name!r} must be an integer, got {value.strip()!r}") from None
        if size == 0 or size < -1:
            raise MeshError(f"mesh spec {spec!r}: size of {name!r} must be positive or -1, got {size}")
        sizes[name] = size
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise MeshError(f"mesh spec {spec!r}: only one axis may be -1, got {', '.join(free)}")
    fixed = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if num_devices % fixed:
            raise MeshError(f"mesh spec {spec!r}: the fixed axes use {fixed} devices, which does not divide the "
                            f"{num_devices} devices available, so {free[0]}=-1 has no size")
        sizes[free[0]] = num_devices // fixed
    elif fixed != num_devices:
        raise MeshError(f"mesh spec {spec!r}: axis sizes multiply to {fixed} but there are {num_devices} devices "
                        f"(use -1 on one axis to take the rest)")
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def make_mesh(spec: str | dict[str, int], devices: Sequence | None = None) -> jax.sharding.Mesh:
    """A Mesh with axes MESH_AXES from a spec string (see parse_mesh_spec) over `devices` (default: all devices
    of all processes). Device order follows the physical topology (jax.make_mesh / mesh_utils); with several TPU
    slices (multislice) the `data` axis spans slices, so only data-parallel traffic crosses the DCN."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices)) if isinstance(spec, str) else {a: spec.get(a, 1) for a in MESH_AXES}
    if isinstance(spec, dict):
        unknown = set(spec) - set(MESH_AXES)
        if unknown:
            raise MeshError(f"unknown mesh axes {sorted(unknown)}; axes are {', '.join(MESH_AXES)}")
        if math.prod(sizes.values()) != len(devices):
            raise MeshError(f"mesh {sizes} has {math.prod(sizes.values())} positions for {len(devices)} devices")
    shape = tuple(sizes[a] for a in MESH_AXES)
    types = (AxisType.Auto,) * len(MESH_AXES)
    slices = {getattr(d, "slice_index", 0) for d in devices}
    if len(slices) > 1:
        from jax.experimental import mesh_utils

        n = len(slices)
        if sizes["data"] % n:
            raise MeshError(f"{n} slices: the data axis ({sizes['data']}) must be a multiple of the slice count")
        ici = (sizes["data"] // n,) + shape[1:]
        arr = mesh_utils.create_hybrid_device_mesh(ici, (n, 1, 1, 1), devices)
        return jax.sharding.Mesh(arr, MESH_AXES, axis_types=types)
    try:
        return jax.make_mesh(shape, MESH_AXES, axis_types=types, devices=devices)
    except (ValueError, NotImplementedError):  # a shape the topology helper cannot lay out: plain order
        return jax.sharding.Mesh(np.asarray(devices, dtype=object).reshape(shape), MESH_AXES, axis_types=types)


def abstract_mesh(sizes: dict[str, int]) -> jax.sharding.AbstractMesh:
    """A device-less mesh of these axis sizes (for planning and shape-only sharding)."""
    return jax.sharding.AbstractMesh(tuple(sizes.get(a, 1) for a in MESH_AXES), MESH_AXES)


def check_model_fits(mesh, text_configs) -> None:
    """Raise MeshError if an MoE decoder's experts cannot be split evenly over the `expert` axis."""
    ep = dict(mesh.shape).get("expert", 1)
    for name, cfg in text_configs:
        if cfg.num_experts and cfg.num_experts % ep:
            raise MeshError(f"{name} has {cfg.num_experts} experts, which do not divide over expert={ep}; choose an "
                            f"expert axis size that divides {cfg.num_experts}")


# ---------------------------------------------------------------------------------------------------------------
# Rules -> PartitionSpecs


def get_rules(rules: str | Rules | None) -> Rules:
    if rules is None:
        return current_rules()
    if isinstance(rules, str):
        if rules not in RULE_PRESETS:
            raise MeshError(f"unknown sharding rules {rules!r}; presets: {', '.join(RULE_PRESETS)}")
        return RULE_PRESETS[rules]
    return rules


def logical_to_spec(axes: tuple[str | None, ...] | None, rules=DEFAULT_RULES, mesh=None, shape=None) -> P:
    """Map logical axis names to a PartitionSpec. A mesh axis is used at most once per spec; with a mesh, axes of
    size 1 are dropped, and with `shape` too, so is any axis whose size does not divide the dimension."""
    if axes is None:
        return P()
    table = dict(rules)
    sizes = dict(mesh.shape) if mesh is not None else None
    used: set[str] = set()
    out = []
    for d, name in enumerate(axes):
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
        keep: list[str] = []
        for a in cand:
            if a in used or (sizes is not None and sizes.get(a, 1) <= 1):
                continue
            if shape is not None and sizes is not None and shape[d] % (math.prod(sizes[b] for b in keep) * sizes[a]):
                continue
            keep.append(a)
        used.update(keep)
        out.append(None if not keep else keep[0] if len(keep) == 1 else tuple(keep))
    return P(*out)


def _var_spec(v, rules, mesh):
    if not isinstance(v, nnx.Variable):
        return P()
    axes = v.get_metadata().get("logical_axes")
    value = v.get_value() if hasattr(v, "get_value") else v.value
    return logical_to_spec(axes, rules, mesh, getattr(value, "shape", None))


def param_specs(state: nnx.State, rules=DEFAULT_RULES, mesh=None):
    """PartitionSpecs for every variable of `state`, from the `logical_axes` metadata set at creation."""
    return jax.tree.map(lambda v: _var_spec(v, rules, mesh), state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def named_shardings(state: nnx.State, mesh, rules=DEFAULT_RULES):
    specs = param_specs(state, rules, mesh)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def path_shardings(model: nnx.Module, mesh, rules=DEFAULT_RULES) -> dict[str, NamedSharding]:
    """{dotted parameter path: NamedSharding} for `checkpoint.assign.load_tensors(..., shardings=...)`; works on
    an `nnx.eval_shape` model (nothing is allocated)."""
    state = nnx.state(model, nnx.Param)
    return {".".join(str(p) for p in path): NamedSharding(mesh, _var_spec(v, rules, mesh))
            for path, v in nnx.to_flat_state(state)}


def create_sharded(factory, mesh, rules=DEFAULT_RULES):
    """Build `factory()` (an nnx.Module constructor call) with every parameter created directly on its shards:
    the full model never exists on one device."""
    abstract = nnx.eval_shape(factory)
    graphdef, abs_state = nnx.split(abstract)
    out = named_shardings(abs_state, mesh, rules)

    def init():
        return nnx.state(factory())

    with activate(mesh, rules):
        state = jax.jit(init, out_shardings=out)()
    return nnx.merge(graphdef, state)


# ---------------------------------------------------------------------------------------------------------------
# The active mesh and rules (read at trace time by the MoE dispatch and by `constrain`)

_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar("omni_jax_rules", default=DEFAULT_RULES)


def current_rules() -> Rules:
    return _RULES.get()


@contextlib.contextmanager
def activate(mesh, rules: str | Rules = DEFAULT_RULES):
    """Make `mesh` and `rules` current: jax.set_mesh for the mesh, plus the rules table omni_jax reads."""
    token = _RULES.set(get_rules(rules))
    try:
        if mesh is None:
            yield
        else:
            with jax.set_mesh(mesh):
                yield
    finally:
        _RULES.reset(token)


def on_mesh(mesh, rules: str | Rules = DEFAULT_RULES):
    """`activate(mesh, rules)` when there is a mesh, else a context that changes nothing (the generators' calls)."""
    return activate(mesh, rules) if mesh is not None else contextlib.nullcontext()


def active_mesh():
    """The mesh set by `activate` / jax.set_mesh, or None (also None inside a shard_map's manual region)."""
    m = jax.sharding.get_abstract_mesh()
    if m.empty or any(t == AxisType.Manual for t in m.axis_types):
        return None
    return m


def constrain(x, axes: tuple[str | None, ...]):
    """Pin an activation to the sharding its logical axes name under the active mesh; identity without one."""
    mesh = active_mesh()
    if mesh is None or math.prod(dict(mesh.shape).values()) == 1:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, current_rules(), mesh, x.shape))


def put_global(x, mesh, spec: P | None = None):
    """A host numpy value -> a global array with NamedSharding(mesh, spec); each process supplies only its own
    devices' slices (the same value must be given on every process)."""
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec or P()), lambda idx: x[idx])

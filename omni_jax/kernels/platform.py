"""Which platform a computation targets ("cpu", "gpu" or "tpu"), for choosing kernel implementations.

Kernels must be chosen by the devices the computation is compiled for, not by `jax.default_backend()`: a CPU
host that compiles for a TPU topology (`jax.experimental.topologies`) must pick the TPU kernels. In order:

1. the `mesh` argument (a `Mesh`, an `AbstractMesh` or a sequence of devices), when given;
2. the mesh made current by `jax.set_mesh` / `omni_jax.sharding.activate` (its abstract device's platform; also
   inside a shard_map's manual region);
3. a platform pinned with `target_platform("tpu")` (a context manager, for callers with neither);
4. `jax.default_backend()`.

Names are normalised: "cuda"/"rocm" -> "gpu".
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

PLATFORMS = ("cpu", "gpu", "tpu")

_PINNED: contextvars.ContextVar[str | None] = contextvars.ContextVar("omni_jax_target_platform", default=None)


def normalise_platform(name: str) -> str:
    name = name.lower()
    return "gpu" if name in ("cuda", "rocm", "gpu") else name


def _mesh_platform(mesh) -> str | None:
    if mesh is None:
        return None
    if isinstance(mesh, jax.sharding.Mesh):
        return mesh.devices.flat[0].platform
    if isinstance(mesh, jax.sharding.AbstractMesh):
        dev = getattr(mesh, "abstract_device", None)
        return None if mesh.empty or dev is None else dev.platform
    devices = list(mesh)  # a sequence of devices
    return devices[0].platform if devices else None


def platform_of(mesh=None) -> str:
    """The platform ("cpu", "gpu", "tpu") the current computation targets; see the module docstring."""
    name = _mesh_platform(mesh)
    if name is None:
        name = _mesh_platform(jax.sharding.get_abstract_mesh())
    if name is None:
        name = _PINNED.get()
    if name is None:
        name = jax.default_backend()
    return normalise_platform(name)


@contextlib.contextmanager
def target_platform(name: str | None):
    """Within the block, `platform_of()` (without a mesh) answers `name` (None: unpin)."""
    if name is not None and normalise_platform(name) not in PLATFORMS:
        raise ValueError(f"unknown platform {name!r}; expected one of {', '.join(PLATFORMS)}")
    token = _PINNED.set(None if name is None else normalise_platform(name))
    try:
        yield
    finally:
        _PINNED.reset(token)


def interpret_for(platform: str) -> bool:
    """Pallas kernels run in interpret mode when the target is neither a TPU nor a GPU (i.e. on CPU)."""
    return platform not in ("tpu", "gpu")

"""Which platform a traced computation is being built for, so kernel entry points can pick an implementation.

`jax.default_backend()` names the host's backend, not the devices a computation is compiled for: compiling for a
TPU topology from a CPU host (omni_jax plan) must still choose the TPU kernels. The platform is read, in order,
from `target(...)` (an explicit override), the active mesh's devices (`jax.set_mesh` / `sharding.activate`, also
inside a shard_map), and the default backend.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu"}
_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("omni_jax_platform", default=None)


def normalize(platform: str) -> str:
    """'cuda'/'rocm' -> 'gpu'; other names lower-cased."""
    p = platform.lower()
    return _ALIASES.get(p, p)


@contextlib.contextmanager
def target(platform: str):
    """Trace the kernels inside this block for `platform` ('cpu', 'gpu', 'tpu'), whatever the mesh says."""
    p = normalize(platform)
    if p not in PLATFORMS:
        raise ValueError(f"unknown platform {platform!r}; choose from {PLATFORMS}")
    token = _OVERRIDE.set(p)
    try:
        yield
    finally:
        _OVERRIDE.reset(token)


def target_platform() -> str:
    """'cpu', 'gpu' or 'tpu': the platform of the devices the computation being traced runs on."""
    p = _OVERRIDE.get()
    if p is not None:
        return p
    mesh = jax.sharding.get_abstract_mesh()
    dev = None if mesh.empty else getattr(mesh, "abstract_device", None)
    if dev is not None and getattr(dev, "platform", None):
        return normalize(dev.platform)
    return normalize(jax.default_backend())

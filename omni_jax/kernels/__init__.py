"""Kernels behind one door each: `<op>/api.py` dispatches to a pure-JAX reference or a Pallas implementation;
platform.py says which platform a computation targets (the mesh's devices, not the default backend)."""
from omni_jax.kernels.attention.api import attention
from omni_jax.kernels.platform import platform_of

__all__ = ["attention", "platform_of"]

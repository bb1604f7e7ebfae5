from omni_jax.kernels.attention.api import attention

__all__ = ["attention"]

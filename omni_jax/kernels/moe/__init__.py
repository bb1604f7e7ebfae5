from omni_jax.kernels.moe.api import expert_ffn

__all__ = ["expert_ffn"]

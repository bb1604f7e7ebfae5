"""Attention behind one door: `attention(q, k, v, mask, scale=..., impl=...)` with the mask described as data
(`AttentionMask`). api.py dispatches; ref.py is the pure-JAX reference; splash.py (TPU), flash_gpu.py and
decode_gpu.py (GPU, Pallas Triton) are the kernels."""

from omni_jax.kernels.attention.api import IMPLS, AttentionImplError, attention, check_impl, choose_impl
from omni_jax.kernels.attention.mask import AttentionMask, AttentionMaskError, block_diagonal

__all__ = ["IMPLS", "AttentionImplError", "AttentionMask", "AttentionMaskError", "attention", "block_diagonal",
           "check_impl", "choose_impl"]

"""The one attention entry point the models call. Pallas splash attention plugs in here (issue: kernels)."""

from __future__ import annotations

from omni_jax.kernels.attention.ref import attention_ref

IMPLS = ("xla",)  # "auto" picks among these by the target platform (kernels/platform.py)


def attention(q, k, v, mask, *, scale: float, impl: str = "auto"):
    """q: [B, T, H, D], k/v: [B, S, KV, D], mask: bool [B, T, S] (or broadcastable). Returns [B, T, H, D]."""
    if impl in ("auto", "xla"):
        return attention_ref(q, k, v, mask, scale)
    raise ValueError(f"unknown attention impl {impl!r}; available: {list(IMPLS)} or 'auto'")

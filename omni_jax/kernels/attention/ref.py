"""Reference (pure JAX) scaled dot-product attention with GQA and an explicit boolean mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attention_ref(q, k, v, mask, scale: float):
    """q: [B, T, H, D], k/v: [B, S, KV, D], mask: bool broadcastable to [B, T, S] (True = attend).

    Scores are formed in the activation dtype, softmax runs in fp32 (float64 for float64 inputs) and is cast
    back before the value product (the reference's eager path). Rows with no visible key return zeros.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    g = h // kv
    qg = q.reshape(b, t, kv, g, d)
    scores = jnp.einsum("BTKGD,BSKD->BKGTS", qg, k) * jnp.asarray(scale, q.dtype)
    m = jnp.broadcast_to(mask, (b, t, scores.shape[-1]))[:, None, None, :, :]
    scores = jnp.where(m, scores.astype(jnp.promote_types(scores.dtype, jnp.float32)), -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(m, probs, 0.0).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKD->BTKGD", probs, v)
    return out.reshape(b, t, h, v.shape[-1])

"""Pure-JAX attention: the reference every kernel is tested against (`attention_ref`, the `xla` implementation),
and `attention_live`, an XLA formulation that reads only the live part of a KV cache (decode on TPU / CPU).

Shapes everywhere: q [B, T, H, D], k/v [B, S, KV, D] with H a multiple of KV (GQA), out [B, T, H, Dv].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from omni_jax.kernels.attention.mask import AttentionMask


def attention_dense(q, k, v, mask, scale: float):
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


def attention_ref(q, k, v, mask: AttentionMask | jax.Array, scale: float):
    """The `xla` implementation: builds the boolean [B, T, S] from the mask spec (or takes a boolean as is)."""
    if isinstance(mask, AttentionMask):
        mask = mask.dense(q.shape[0], q.shape[1], k.shape[1])
    return attention_dense(q, k, v, mask, scale)


def attention_live(q, k, v, mask: AttentionMask, scale: float, *, chunk: int = 512, layer=None):
    """Online-softmax attention over key chunks [lo, hi) of the batch's live range only (inference: the loop has a
    traced trip count, so it is not reverse-differentiable).

    Chunks before the first key any row may see (sliding window) and after the last (kv_lengths / causal) are
    never read; a chunk that would run past S is read clamped (start S - c) with the overlap masked, so the
    cache is never padded or copied. Same numerics as `attention_ref` up to summation order (fp32 softmax).
    layer: k/v are every layer's cache [L, B, S, KV, D]; the chunks are read from layer `layer` in place.
    """
    b, t, h, d = q.shape
    s, kvh = k.shape[-3], k.shape[-2]
    g = h // kvh
    c = min(chunk, s)
    off, kv_len = mask.per_row(b)
    lo, hi = mask.key_range(b, t, s)
    first = jnp.min(lo) // c
    last = (jnp.max(hi) + c - 1) // c
    qg = q.reshape(b, t, kvh, g, d)
    qpos = (jnp.arange(t)[None, :] + off[:, None])[:, None, None, :, None]  # [B, 1, 1, T, 1]
    q_seg = None if not mask.has_segments else jnp.broadcast_to(mask.q_segment_ids, (b, t))[:, None, None, :, None]
    kv_seg_all = None if not mask.has_segments else jnp.broadcast_to(mask.kv_segment_ids, (b, s))
    acc_t = jnp.promote_types(q.dtype, jnp.float32)

    def body(i, carry):
        m_prev, l_prev, acc = carry
        start = jnp.minimum(i * c, s - c)
        if layer is None:
            kc = jax.lax.dynamic_slice_in_dim(k, start, c, axis=1)
            vc = jax.lax.dynamic_slice_in_dim(v, start, c, axis=1)
        else:
            kc, vc = (jax.lax.dynamic_slice(a, (layer, 0, start, 0, 0), (1,) + a.shape[1:2] + (c,) + a.shape[3:])[0]
                      for a in (k, v))
        kc, vc = kc.astype(q.dtype), vc.astype(q.dtype)
        kpos = start + jnp.arange(c)
        sc = jnp.einsum("BTKGD,BSKD->BKGTS", qg, kc, preferred_element_type=acc_t) * scale
        kv_seg = None
        if kv_seg_all is not None:
            kv_seg = jax.lax.dynamic_slice_in_dim(kv_seg_all, start, c, axis=1)[:, None, None, None, :]
        ok = mask.rule(qpos, kpos[None, None, None, None, :],
                       None if kv_len is None else kv_len[:, None, None, None, None], q_seg, kv_seg)
        ok &= (kpos >= i * c)[None, None, None, None, :]  # the clamped last chunk: skip keys already counted
        sc = jnp.where(ok, sc, -jnp.inf)
        m_new = jnp.maximum(m_prev, jnp.max(sc, axis=-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.where(ok, jnp.exp(sc - m_safe[..., None]), 0.0)
        alpha = jnp.exp(jnp.where(jnp.isfinite(m_prev), m_prev, m_safe) - m_safe)
        l_new = alpha * l_prev + jnp.sum(p, axis=-1)
        pv = jnp.einsum("BKGTS,BSKD->BKGTD", p.astype(vc.dtype), vc, preferred_element_type=acc_t)
        return m_new, l_new, alpha[..., None] * acc + pv

    init = (jnp.full((b, kvh, g, t), -jnp.inf, acc_t), jnp.zeros((b, kvh, g, t), acc_t),
            jnp.zeros((b, kvh, g, t, v.shape[-1]), acc_t))
    _, l_fin, acc = jax.lax.fori_loop(first, last, body, init)
    out = jnp.where(l_fin[..., None] > 0, acc / jnp.where(l_fin > 0, l_fin, 1.0)[..., None], 0.0)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, v.shape[-1]).astype(q.dtype)

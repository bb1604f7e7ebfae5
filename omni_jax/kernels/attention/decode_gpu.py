"""GPU decode attention: split-K flash-decoding over the KV cache (Pallas, Triton lowering), inference only.

Cache layout: today's [B, S, KV, D], read in place (a BlockSpec picks kv head h's [S, D] rows of batch row b; no
per-step transpose or copy of the cache). Queries are few (T <= 16 new tokens per row): the G = H / KV query heads
of one kv head and the T new tokens form the rows of one tile ([T * G, D], padded to 16 rows), so K/V are read
once per kv head.

Grid (B, KV, splits): split p covers keys [p * L, (p + 1) * L) and loops only over blocks below the row's live
end (min(kv_lengths, causal bound)) and above the sliding window's start, so a step reads each row's live part
only. Each split writes an unnormalised partial (acc, max, sum); one small XLA reduction combines the splits.
The last block of a cache whose length is not a block multiple is read shifted back (start S - bk) with the
already-counted keys masked, so nothing is read out of bounds and the cache is never padded.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from omni_jax.kernels.attention.mask import AttentionMask

_NEG = -1e30
MAX_SPLITS = 32


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def _dot(a, b, trans_b=False):
    return plgpu.dot(a, b, False, trans_b, allow_tf32=a.dtype != jnp.float32).astype(jnp.float32)


def _kernel(off_ref, len_ref, *refs, rule, t, g, bk, split_len, s, scale, causal, window, has_seg):
    if has_seg:
        qseg_ref, kseg_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, m_ref, l_ref = refs
    p = pl.program_id(2)
    off, kv_len = off_ref[()], jnp.minimum(len_ref[()], s)
    q = q_ref[...]  # [R, D], row r = query (r // g), head (r % g)
    rows = q.shape[0]
    r = jnp.arange(rows)
    query = jnp.minimum(r // g, t - 1)  # padded rows repeat the last query (their output is dropped)
    qpos = query + off
    q_seg = None
    if has_seg:  # each row's query segment id, by a one-hot sum (no gather in the kernel)
        seg = qseg_ref[...]
        q_seg = jnp.sum(jnp.where(query[:, None] == jnp.arange(seg.shape[0])[None, :], seg[None, :], 0), axis=1)
    hi = kv_len
    if causal:
        hi = jnp.minimum(hi, off + t)
    lo = jnp.int32(0)
    if window is not None:
        lo = jnp.maximum(lo, off - window + 1)
    start, end = jnp.maximum(lo, p * split_len), jnp.minimum(hi, p * split_len + split_len)
    j_lo = lax.div(start, bk)
    j_hi = jnp.where(end > start, lax.div(end + bk - 1, bk), j_lo)

    def body(j, carry):
        acc, m, denom = carry
        base = jnp.minimum(j * bk, s - bk)  # the last block of a ragged cache is read shifted back
        sl = pl.ds(base, bk)
        kpos = base + jnp.arange(bk)
        ok = rule(qpos[:, None], kpos[None, :], kv_len, None if q_seg is None else q_seg[:, None],
                  kseg_ref[sl][None, :] if has_seg else None)
        ok &= (kpos >= jnp.maximum(j * bk, start))[None, :] & (kpos < end)[None, :]
        sc = jnp.where(ok, _dot(q, k_ref[sl, :], trans_b=True) * scale, _NEG)
        m_new = jnp.maximum(m, jnp.max(sc, axis=1))
        pr = jnp.where(ok, jnp.exp(sc - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        v = v_ref[sl, :]
        return acc * alpha[:, None] + _dot(pr.astype(v.dtype), v), m_new, denom * alpha + jnp.sum(pr, axis=1)

    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((rows,), _NEG, jnp.float32), jnp.zeros((rows,), jnp.float32))
    acc, m, denom = lax.fori_loop(j_lo, j_hi, body, init)
    o_ref[...], m_ref[...], l_ref[...] = acc, m, denom


def decode_attention(q, k, v, mask: AttentionMask, scale: float, *, interpret: bool = False):
    """q [B, T, H, D] (T <= 16), k/v cache [B, S, KV, D] -> [B, T, H, D]. Power-of-two head dims read the cache in
    place; other head dims (and caches shorter than 16) are padded first (a copy: slow path)."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    if t > 16:
        raise ValueError(f"decode attention takes at most 16 new tokens per row, got {t}; use 'flash'")
    g = h // kvh
    dp = _pow2(d)
    if dp != d or s < 16:
        s_new = max(s, 16)
        pad = lambda x: jnp.pad(x, ((0, 0), (0, s_new - x.shape[1]), (0, 0), (0, dp - d)))  # noqa: E731
        k, v = pad(k), pad(v)
        kv_len = mask.per_row(b)[1]
        mask = AttentionMask(causal=mask.causal, window=mask.window, q_offset=mask.q_offset,
                             q_segment_ids=mask.q_segment_ids,
                             kv_segment_ids=None if not mask.has_segments else jnp.pad(
                                 jnp.broadcast_to(mask.kv_segment_ids, (b, s)), ((0, 0), (0, s_new - s))),
                             kv_lengths=jnp.full((b,), s, jnp.int32) if kv_len is None else jnp.minimum(kv_len, s))
        q = jnp.pad(q, ((0, 0), (0, 0), (0, 0), (0, dp - d)))
        s = s_new
    bk = min(64, 1 << (s.bit_length() - 1))  # a power of two <= S
    splits = max(1, min(MAX_SPLITS, -(-s // 256)))
    per_split = -(-s // splits)
    split_len = -(-per_split // bk) * bk  # a multiple of the block
    splits = -(-s // split_len)
    rows = _pow2(t * g)
    # [B, T, H, D] -> [B, KV, T * G, D] (rows: query-major, head-minor), padded to a power of two >= 16 rows.
    qr = q.reshape(b, t, kvh, g, dp).transpose(0, 2, 1, 3, 4).reshape(b, kvh, t * g, dp)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, rows - t * g), (0, 0)))
    off, kv_len = mask.per_row(b)
    args = [off, jnp.full((b,), s, jnp.int32) if kv_len is None else kv_len]
    specs = [pl.BlockSpec((None,), lambda b_, h_, p: (b_,)), pl.BlockSpec((None,), lambda b_, h_, p: (b_,))]
    if mask.has_segments:
        tq = _pow2(t, 1)
        args += [jnp.pad(jnp.broadcast_to(mask.q_segment_ids, (b, t)).astype(jnp.int32), ((0, 0), (0, tq - t))),
                 jnp.broadcast_to(mask.kv_segment_ids, (b, s)).astype(jnp.int32)]
        specs += [pl.BlockSpec((None, tq), lambda b_, h_, p: (b_, 0)),
                  pl.BlockSpec((None, s), lambda b_, h_, p: (b_, 0))]
    specs += [pl.BlockSpec((None, None, rows, dp), lambda b_, h_, p: (b_, h_, 0, 0)),
              pl.BlockSpec((None, s, None, dp), lambda b_, h_, p: (b_, 0, h_, 0)),
              pl.BlockSpec((None, s, None, dp), lambda b_, h_, p: (b_, 0, h_, 0))]
    kernel = functools.partial(_kernel, rule=AttentionMask(causal=mask.causal, window=mask.window).rule, t=t, g=g,
                               bk=bk, split_len=split_len, s=s, scale=float(scale), causal=mask.causal,
                               window=mask.window, has_seg=mask.has_segments)
    part = jax.ShapeDtypeStruct((b, kvh, splits, rows, dp), jnp.float32)
    stat = jax.ShapeDtypeStruct((b, kvh, splits, rows), jnp.float32)
    acc, m, denom = pl.pallas_call(
        kernel, grid=(b, kvh, splits), in_specs=specs,
        out_specs=[pl.BlockSpec((None, None, None, rows, dp), lambda b_, h_, p: (b_, h_, p, 0, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda b_, h_, p: (b_, h_, p, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda b_, h_, p: (b_, h_, p, 0))],
        out_shape=[part, stat, stat], interpret=interpret, name="omni_decode_attention",
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
    )(*args, qr, k, v)
    # Combine the splits: rescale each partial to the global max.
    m_all = jnp.max(m, axis=2, keepdims=True)
    w = jnp.where(denom > 0, jnp.exp(m - m_all), 0.0)
    total = jnp.sum(denom * w, axis=2)
    out = jnp.sum(acc * w[..., None], axis=2)
    out = jnp.where(total[..., None] > 0, out / jnp.where(total > 0, total, 1.0)[..., None], 0.0)
    out = out[:, :, : t * g, :d].reshape(b, kvh, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)
    return out.astype(q.dtype)

"""GPU flash attention: our Pallas kernels with the Triton lowering, forward and backward (custom VJP).

Masks come as data (AttentionMask): every kernel evaluates `AttentionMask.rule` per [block_q, block_k] tile from
positions, per-row (q_offset, kv_length) scalars and segment ids, and loops only over the key blocks that the
causal / sliding-window / kv_lengths bounds leave (no [T, S] mask, no [heads, T, S] scores in memory).

Kernels (grid over (q or k block, batch, head)):
  _fwd   o [B, T, H, D] and the row logsumexp [B, H, T] (fp32 online softmax);
  _dq    dq, looping over key blocks like the forward;
  _dkv   dk, dv per *query* head, looping over query blocks; GQA sums the G query heads of a kv head after the
         kernel (a [B, S, H, D] temporary, the size of q, never a score buffer).
delta = rowsum(o * do) is one fused XLA reduction. T and S are padded to block multiples and the head dim to a
power of two (zeros: exact); padded keys are masked by the static key count. On CPU `interpret=True`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from omni_jax.kernels.attention.mask import AttentionMask

_NEG = -1e30  # finite "minus infinity": a fully masked tile never produces NaN


def _pow2(n: int, lo: int = 16) -> int:
    return max(lo, 1 << (max(n, 1) - 1).bit_length())


def _blocks(t: int, s: int) -> tuple[int, int]:
    return min(64, _pow2(t)), min(64, _pow2(s))


def _cdiv(a, b):
    return lax.div(a + b - 1, b)


class _Spec:
    """Static facts of one call, shared by the three kernels."""

    def __init__(self, mask: AttentionMask, t, s, t_pad, s_pad, bq, bk, heads, groups, scale, interpret):
        self.causal, self.window, self.has_seg = mask.causal, mask.window, mask.has_segments
        self.rule = AttentionMask(causal=mask.causal, window=mask.window).rule
        self.t, self.s, self.t_pad, self.s_pad, self.bq, self.bk = t, s, t_pad, s_pad, bq, bk
        self.heads, self.groups, self.scale, self.interpret = heads, groups, scale, interpret

    def key_blocks(self, i, off, kv_len):
        """Key blocks [lo, hi) that query block i may see."""
        hi = kv_len
        if self.causal:
            hi = jnp.minimum(hi, i * self.bq + self.bq + off)
        lo = jnp.int32(0)
        if self.window is not None:
            lo = jnp.maximum(lo, i * self.bq + off - self.window + 1)
        hi = jnp.maximum(hi, lo)
        return lax.div(lo, self.bk), _cdiv(hi, self.bk)

    def query_blocks(self, j, off, kv_len):
        """Query blocks [lo, hi) that may see key block j."""
        n = self.t_pad // self.bq
        lo, hi = jnp.int32(0), jnp.int32(n)
        if self.causal:  # qpos >= j * bk  <=>  i * bq + r + off >= j * bk
            lo = jnp.clip(lax.div(jnp.maximum(j * self.bk - off, 0), self.bq), 0, n)
        if self.window is not None:  # qpos - window < key <= j*bk + bk - 1
            hi = jnp.clip(_cdiv(jnp.maximum(j * self.bk + self.bk - 1 + self.window - off, 0), self.bq), 0, n)
        hi = jnp.where(j * self.bk < kv_len, jnp.maximum(hi, lo), lo)
        return lo, hi

    def tile_mask(self, i, j, off, kv_len, q_seg, k_seg):
        qpos = i * self.bq + jnp.arange(self.bq) + off
        kpos = j * self.bk + jnp.arange(self.bk)
        return self.rule(qpos[:, None], kpos[None, :], kv_len, None if q_seg is None else q_seg[:, None],
                         None if k_seg is None else k_seg[None, :])


def _dot(a, b, trans_a=False, trans_b=False):
    """A tile product with fp32 accumulation; fp32 inputs stay fp32 (no TF32: the parity tests need 1e-5)."""
    return plgpu.dot(a, b, trans_a, trans_b, allow_tf32=a.dtype != jnp.float32).astype(jnp.float32)


def _scores(spec, q, k):
    return _dot(q, k, trans_b=True) * spec.scale


def _fwd_kernel(off_ref, len_ref, *refs, spec: _Spec):
    if spec.has_seg:
        qseg_ref, kseg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
    i = pl.program_id(0)
    off, kv_len = off_ref[()], jnp.minimum(len_ref[()], spec.s)
    q = q_ref[...]
    q_seg = qseg_ref[...] if spec.has_seg else None

    def body(j, carry):
        acc, m, denom = carry
        sl = pl.ds(j * spec.bk, spec.bk)
        k, v = k_ref[sl, :], v_ref[sl, :]
        ok = spec.tile_mask(i, j, off, kv_len, q_seg, kseg_ref[sl] if spec.has_seg else None)
        s = jnp.where(ok, _scores(spec, q, k), _NEG)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        p = jnp.where(ok, jnp.exp(s - m_new[:, None]), 0.0)
        alpha = jnp.exp(m - m_new)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, denom * alpha + jnp.sum(p, axis=1)

    j_lo, j_hi = spec.key_blocks(i, off, kv_len)
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((spec.bq,), _NEG, jnp.float32),
            jnp.zeros((spec.bq,), jnp.float32))
    acc, m, denom = lax.fori_loop(j_lo, j_hi, body, init)
    live = denom > 0
    safe = jnp.where(live, denom, 1.0)
    o_ref[...] = jnp.where(live[:, None], acc / safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(live, m + jnp.log(safe), 0.0)


def _dq_kernel(off_ref, len_ref, *refs, spec: _Spec):
    if spec.has_seg:
        qseg_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
    i = pl.program_id(0)
    off, kv_len = off_ref[()], jnp.minimum(len_ref[()], spec.s)
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg = qseg_ref[...] if spec.has_seg else None

    def body(j, dq):
        sl = pl.ds(j * spec.bk, spec.bk)
        k, v = k_ref[sl, :], v_ref[sl, :]
        ok = spec.tile_mask(i, j, off, kv_len, q_seg, kseg_ref[sl] if spec.has_seg else None)
        p = jnp.where(ok, jnp.exp(_scores(spec, q, k) - lse[:, None]), 0.0)
        dp = _dot(do, v, trans_b=True)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    j_lo, j_hi = spec.key_blocks(i, off, kv_len)
    dq = lax.fori_loop(j_lo, j_hi, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


def _dkv_kernel(off_ref, len_ref, *refs, spec: _Spec):
    if spec.has_seg:
        qseg_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
    j = pl.program_id(0)
    off, kv_len = off_ref[()], jnp.minimum(len_ref[()], spec.s)
    k, v = k_ref[...], v_ref[...]
    k_seg = kseg_ref[...] if spec.has_seg else None

    def body(i, carry):
        dk, dv = carry
        sl = pl.ds(i * spec.bq, spec.bq)
        q, do, lse, delta = q_ref[sl, :], do_ref[sl, :], lse_ref[sl], delta_ref[sl]
        ok = spec.tile_mask(i, j, off, kv_len, qseg_ref[sl] if spec.has_seg else None, k_seg)
        p = jnp.where(ok, jnp.exp(_scores(spec, q, k) - lse[:, None]), 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, trans_a=True)
        dp = _dot(do, v, trans_b=True)
        ds = p * (dp - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    i_lo, i_hi = spec.query_blocks(j, off, kv_len)
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = lax.fori_loop(i_lo, i_hi, body, (zeros, zeros))
    dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# -- pallas_call wrappers (padded shapes: q [B, Tp, H, Dp], k/v [B, Sp, KV, Dp]) ------------------------------


def _triton(dp: int):
    """Triton compiler parameters (naming them selects the Triton lowering over Mosaic GPU)."""
    return plgpu.CompilerParams(num_warps=4 if dp <= 64 else 8, num_stages=2)


def _row_specs(spec: _Spec, has_seg: bool, q_block: bool):
    """BlockSpecs of (offset [B], kv_len [B], [q_seg [B, Tp], kv_seg [B, Sp]]) for a grid (blk, b, h)."""
    specs = [pl.BlockSpec((None,), lambda x, b, h: (b,)), pl.BlockSpec((None,), lambda x, b, h: (b,))]
    if has_seg:
        if q_block:
            specs.append(pl.BlockSpec((None, spec.bq), lambda x, b, h: (b, x)))
            specs.append(pl.BlockSpec((None, spec.s_pad), lambda x, b, h: (b, 0)))
        else:
            specs.append(pl.BlockSpec((None, spec.t_pad), lambda x, b, h: (b, 0)))
            specs.append(pl.BlockSpec((None, spec.bk), lambda x, b, h: (b, x)))
    return specs


def _fwd_call(spec: _Spec, rows, q, k, v):
    b, _, h, dp = q.shape
    g = spec.groups
    q_spec = pl.BlockSpec((None, spec.bq, None, dp), lambda i, b_, h_: (b_, i, h_, 0))
    kv_spec = pl.BlockSpec((None, spec.s_pad, None, dp), lambda i, b_, h_: (b_, 0, h_ // g, 0))
    return pl.pallas_call(
        functools.partial(_fwd_kernel, spec=spec),
        grid=(spec.t_pad // spec.bq, b, h),
        in_specs=_row_specs(spec, spec.has_seg, True) + [q_spec, kv_spec, kv_spec],
        out_specs=[q_spec, pl.BlockSpec((None, None, spec.bq), lambda i, b_, h_: (b_, h_, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, spec.t_pad), jnp.float32)],
        interpret=spec.interpret, name="omni_flash_fwd", compiler_params=_triton(dp),
    )(*rows, q, k, v)


def _bwd_call(spec: _Spec, rows, q, k, v, o, lse, do):
    b, _, h, dp = q.shape
    g = spec.groups
    delta = jnp.einsum("BTHD,BTHD->BHT", o.astype(jnp.float32), do.astype(jnp.float32))
    q_blk = pl.BlockSpec((None, spec.bq, None, dp), lambda i, b_, h_: (b_, i, h_, 0))
    kv_all = pl.BlockSpec((None, spec.s_pad, None, dp), lambda i, b_, h_: (b_, 0, h_ // g, 0))
    row_blk = pl.BlockSpec((None, None, spec.bq), lambda i, b_, h_: (b_, h_, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec),
        grid=(spec.t_pad // spec.bq, b, h),
        in_specs=_row_specs(spec, spec.has_seg, True) + [q_blk, kv_all, kv_all, q_blk, row_blk, row_blk],
        out_specs=q_blk, out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=spec.interpret, name="omni_flash_dq", compiler_params=_triton(dp),
    )(*rows, q, k, v, do, lse, delta)
    q_all = pl.BlockSpec((None, spec.t_pad, None, dp), lambda j, b_, h_: (b_, 0, h_, 0))
    kv_blk = pl.BlockSpec((None, spec.bk, None, dp), lambda j, b_, h_: (b_, j, h_ // g, 0))
    out_blk = pl.BlockSpec((None, spec.bk, None, dp), lambda j, b_, h_: (b_, j, h_, 0))
    row_all = pl.BlockSpec((None, None, spec.t_pad), lambda j, b_, h_: (b_, h_, 0))
    per_head = jax.ShapeDtypeStruct((b, spec.s_pad, h, dp), jnp.float32)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, spec=spec),
        grid=(spec.s_pad // spec.bk, b, h),
        in_specs=_row_specs(spec, spec.has_seg, False) + [q_all, kv_blk, kv_blk, q_all, row_all, row_all],
        out_specs=[out_blk, out_blk], out_shape=[per_head, per_head],
        interpret=spec.interpret, name="omni_flash_dkv", compiler_params=_triton(dp),
    )(*rows, q, k, v, do, lse, delta)
    kvh = k.shape[2]
    dk = dk.reshape(b, spec.s_pad, kvh, g, dp).sum(3).astype(k.dtype)
    dv = dv.reshape(b, spec.s_pad, kvh, g, dp).sum(3).astype(v.dtype)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(spec, rows, q, k, v):
    return _fwd_call(spec, rows, q, k, v)[0]


def _flash_fwd(spec, rows, q, k, v):
    o, lse = _fwd_call(spec, rows, q, k, v)
    return o, (rows, q, k, v, o, lse)


def _flash_bwd(spec, res, do):
    rows, q, k, v, o, lse = res
    dq, dk, dv = _bwd_call(spec, rows, q, k, v, o, lse, do)
    return jax.tree.map(lambda x: None if x is None else jnp.zeros(x.shape, jax.dtypes.float0), rows), dq, dk, dv


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, mask: AttentionMask, scale: float, *, interpret: bool = False):
    """q [B, T, H, D], k/v [B, S, KV, D] -> [B, T, H, Dv] (Dv == D). Differentiable in q, k, v."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    if v.shape[-1] != d:
        raise ValueError(f"flash attention needs equal q/k and v head dims, got {d} and {v.shape[-1]}")
    bq, bk = _blocks(t, s)
    t_pad, s_pad, dp = -(-t // bq) * bq, -(-s // bk) * bk, _pow2(d)
    spec = _Spec(mask, t, s, t_pad, s_pad, bq, bk, h, h // kvh, float(scale), bool(interpret))
    off, kv_len = mask.per_row(b)
    rows = [off, jnp.full((b,), s, jnp.int32) if kv_len is None else kv_len]
    if mask.has_segments:
        q_seg = jnp.broadcast_to(mask.q_segment_ids, (b, t)).astype(jnp.int32)
        kv_seg = jnp.broadcast_to(mask.kv_segment_ids, (b, s)).astype(jnp.int32)
        rows += [jnp.pad(q_seg, ((0, 0), (0, t_pad - t))), jnp.pad(kv_seg, ((0, 0), (0, s_pad - s)))]
    pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n - x.shape[1]), (0, 0), (0, dp - d)))  # noqa: E731
    out = _flash(spec, tuple(rows), pad(q, t_pad), pad(k, s_pad), pad(v, s_pad))
    return out[:, :t, :, :d]

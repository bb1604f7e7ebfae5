"""`fused_decode`: the expert FFN for decode-sized inputs (N tokens x K selected experts, N*K up to ~64) in two
Pallas kernels (Triton lowering), with no sort and no gathered copy of any weight.

1. gate/up: one program per (token, selected expert) pair and block of `bi` expert-MLP rows: reads that expert's
   gate and up rows in place from the stacked [E, I, H] weights (contiguous rows, contraction along H), and
   writes h = silu(gate) * up [N*K, I].
2. down: one program per (token, block of `bh` hidden rows): for each of the token's K experts reads the expert's
   down rows [bh, I] in place from [E, H, I], applies the routing weight and sums over K (no atomics, no
   [N, K, H] intermediate).

Decode does not train; the gradient (for completeness and tests) is that of the `gather` path, which computes the
same function in XLA. On a non-GPU platform the kernels run in Pallas interpret mode.
Shapes: x [N, H]; idx int [N, K] (E = no expert: contributes 0); weights [N, K]; w_gate/w_up [E, I, H];
w_down [E, H, I].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from omni_jax.kernels.moe.ref import expert_ffn_gather
from omni_jax.kernels.platform import platform_of

# Block sizes (powers of two): rows of the expert weights per program and the contraction chunk. vLLM's tuned H200
# tiles for E=128, I=768 at batch 1 are 64 wide with 64-deep chunks; 4 warps. To be measured on the GPU.
ROW_BLOCK = 64
CHUNK = 128
NUM_WARPS = 4
NUM_STAGES = 3


def _pow2(d: int, cap: int) -> int:
    b = 16
    while b < min(d, cap):
        b *= 2
    return b


def _gate_up_kernel(idx_ref, x_ref, wg_ref, wu_ref, h_ref, *, k: int, num_experts: int, bi: int, bh: int):
    p, j = pl.program_id(0), pl.program_id(1)
    e = idx_ref[p]
    hdim, inner = x_ref.shape[1], wg_ref.shape[1]
    ii = j * bi + jnp.arange(bi)
    i_ok = ii < inner
    tok = p // k

    def body(c, carry):
        g, u = carry
        hh = c * bh + jnp.arange(bh)
        h_ok = hh < hdim
        xv = plgpu.load(x_ref.at[tok, pl.ds(c * bh, bh)], mask=h_ok, other=0.0).astype(jnp.float32)
        mask = i_ok[:, None] & h_ok[None, :]
        wg = plgpu.load(wg_ref.at[e, pl.ds(j * bi, bi), pl.ds(c * bh, bh)], mask=mask, other=0.0)
        wu = plgpu.load(wu_ref.at[e, pl.ds(j * bi, bi), pl.ds(c * bh, bh)], mask=mask, other=0.0)
        g = g + jnp.sum(wg.astype(jnp.float32) * xv[None, :], axis=1)
        u = u + jnp.sum(wu.astype(jnp.float32) * xv[None, :], axis=1)
        return g, u

    @pl.when(e < num_experts)
    def _compute():
        zero = jnp.zeros((bi,), jnp.float32)
        g, u = jax.lax.fori_loop(0, pl.cdiv(hdim, bh), body, (zero, zero))
        h = g * jax.nn.sigmoid(g) * u
        plgpu.store(h_ref.at[p, pl.ds(j * bi, bi)], h.astype(h_ref.dtype), mask=i_ok)

    @pl.when(e >= num_experts)
    def _none():
        plgpu.store(h_ref.at[p, pl.ds(j * bi, bi)], jnp.zeros((bi,), h_ref.dtype), mask=i_ok)


def _down_kernel(idx_ref, wt_ref, h_ref, wd_ref, y_ref, *, k: int, num_experts: int, bo: int, bi: int):
    n, j = pl.program_id(0), pl.program_id(1)
    hdim, inner = wd_ref.shape[1], wd_ref.shape[2]
    oo = j * bo + jnp.arange(bo)
    o_ok = oo < hdim
    acc = jnp.zeros((bo,), jnp.float32)
    for s in range(k):  # the token's K experts: static unroll
        p = n * k + s
        e = idx_ref[p]
        ec = jnp.minimum(e, num_experts - 1)
        scale = jnp.where(e < num_experts, wt_ref[p].astype(jnp.float32), 0.0)

        def body(c, a, p=p, ec=ec):
            ii = c * bi + jnp.arange(bi)
            i_ok = ii < inner
            hv = plgpu.load(h_ref.at[p, pl.ds(c * bi, bi)], mask=i_ok, other=0.0).astype(jnp.float32)
            wd = plgpu.load(wd_ref.at[ec, pl.ds(j * bo, bo), pl.ds(c * bi, bi)],
                            mask=o_ok[:, None] & i_ok[None, :], other=0.0)
            return a + jnp.sum(wd.astype(jnp.float32) * hv[None, :], axis=1)

        acc = acc + scale * jax.lax.fori_loop(0, pl.cdiv(inner, bi), body, jnp.zeros((bo,), jnp.float32))
    plgpu.store(y_ref.at[n, pl.ds(j * bo, bo)], acc.astype(y_ref.dtype), mask=o_ok)


def _fused(x, idx, weights, w_gate, w_up, w_down, interpret: bool):
    n, k = idx.shape
    e, inner, hdim = w_gate.shape
    flat = idx.reshape(-1).astype(jnp.int32)
    params = plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES)
    bi, bh = _pow2(inner, ROW_BLOCK), _pow2(hdim, CHUNK)
    h = pl.pallas_call(
        functools.partial(_gate_up_kernel, k=k, num_experts=e, bi=bi, bh=bh),
        out_shape=jax.ShapeDtypeStruct((n * k, inner), x.dtype), grid=(n * k, pl.cdiv(inner, bi)),
        compiler_params=params, interpret=interpret, name="moe_decode_gate_up",
    )(flat, x, w_gate.astype(x.dtype), w_up.astype(x.dtype))
    bo, bi2 = _pow2(hdim, ROW_BLOCK), _pow2(inner, CHUNK)
    return pl.pallas_call(
        functools.partial(_down_kernel, k=k, num_experts=e, bo=bo, bi=bi2),
        out_shape=jax.ShapeDtypeStruct((n, hdim), x.dtype), grid=(n, pl.cdiv(hdim, bo)),
        compiler_params=params, interpret=interpret, name="moe_decode_down",
    )(flat, weights.reshape(-1).astype(x.dtype), h, w_down.astype(x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _fused_vjp(x, idx, weights, w_gate, w_up, w_down, interpret):
    return _fused(x, idx, weights, w_gate, w_up, w_down, interpret)


def _fwd(x, idx, weights, w_gate, w_up, w_down, interpret):
    return _fused(x, idx, weights, w_gate, w_up, w_down, interpret), (x, idx, weights, w_gate, w_up, w_down)


def _bwd(interpret, res, dy):
    x, idx, weights, w_gate, w_up, w_down = res
    e = w_gate.shape[0]
    ok = idx < e  # copies with no expert contribute nothing
    w0 = jnp.where(ok, weights, 0)
    _, pull = jax.vjp(lambda a, w, g, u, d: expert_ffn_gather(a, jnp.where(ok, idx, 0), w, g, u, d),
                      x, w0, w_gate, w_up, w_down)
    dx, dw, dg, du, dd = pull(dy)
    return dx, None, jnp.where(ok, dw, 0), dg, du, dd


_fused_vjp.defvjp(_fwd, _bwd)


def expert_ffn_fused_decode(x, idx, weights, w_gate, w_up, w_down, *, interpret: bool | None = None):
    """x [N, H], idx [N, K], weights [N, K], w_gate/w_up [E, I, H], w_down [E, H, I] -> [N, H]."""
    if interpret is None:
        interpret = platform_of() != "gpu"
    with jax.named_scope("moe_fused_decode"):
        return _fused_vjp(x, idx, weights, w_gate, w_up, w_down, interpret)

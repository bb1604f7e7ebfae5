"""`triton_gmm`: the expert FFN for GPU prefill/training with our Pallas grouped-matmul kernels (Triton lowering).

Token copies are sorted by expert into row tiles, each tile owned by one expert (ref.tile_layout); three grouped
matmuls (gate, up, down) each run one program per (row tile, output column block), reading the owner's weight
block in place from the stacked [E, out, in] weights (a [bn, bk] block of rows, contracted along the weights'
minor dim: no transposed or gathered copy of the weights). Our VJP: input gradient with the same kernel reading
the weights untransposed ([bk, bn] blocks), weight gradient with one program per (expert, out block, in block)
looping over that expert's tiles, written in the [E, out, in] layout. Tiles past the last group and experts with
no copy are skipped (zeros written).

On a non-GPU platform the kernels run in Pallas interpret mode (CPU tests). The lowering is Triton's (jax 0.10 and
0.11; deprecated but supported in 0.11).
Shapes: x [N, H]; idx int [N, K] (E = no expert); weights [N, K]; w_gate/w_up [E, I, H]; w_down [E, H, I].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from omni_jax.kernels.moe.ref import tile_layout
from omni_jax.kernels.platform import platform_of


@dataclasses.dataclass(frozen=True)
class Blocks:
    """Static Triton block sizes (powers of two >= 16) and launch parameters."""

    bm: int  # rows per tile
    bn: int  # output columns per program
    bk: int  # contraction chunk
    num_warps: int = 4
    num_stages: int = 3
    interpret: bool = False


def _pow2(d: int, cap: int) -> int:
    b = 16
    while b < min(d, cap):
        b *= 2
    return b


def blocks(m: int, num_experts: int, n: int, k: int, interpret: bool) -> Blocks:
    """Row tile about the mean group size (16..128); 128 output columns, 64-deep contraction chunks (H100/H200
    guesses until measured; the released shapes 2048/768/1024/384 divide them)."""
    mean = max(m // max(num_experts, 1), 1)
    bm = 16
    while bm < 128 and 2 * bm <= mean:
        bm *= 2
    return Blocks(bm, _pow2(n, 128), _pow2(k, 64), 4, 3, interpret)


def _dot(a, b, trans_a=False, trans_b=False):
    prec = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plgpu.dot(a, b, trans_a=trans_a, trans_b=trans_b, precision=prec)


def _tile_kernel(tile_e_ref, a_ref, w_ref, o_ref, *, b: Blocks, num_experts: int, transpose_w: bool):
    """o[tile rows, j block] = a[tile rows, :] @ W[e]^T (transpose_w; W[e] is [N, C]) or @ W[e] (W[e] is [C, N])."""
    t, j = pl.program_id(0), pl.program_id(1)
    e = tile_e_ref[t]
    c_dim = a_ref.shape[1]
    n_dim = o_ref.shape[1]
    rows = pl.ds(t * b.bm, b.bm)
    cols = j * b.bn + jnp.arange(b.bn)
    col_ok = cols < n_dim

    @pl.when(e < num_experts)
    def _compute():
        def body(c, acc):
            cc = c * b.bk + jnp.arange(b.bk)
            c_ok = cc < c_dim
            a = plgpu.load(a_ref.at[rows, pl.ds(c * b.bk, b.bk)], mask=c_ok[None, :], other=0.0)
            if transpose_w:  # W[e] [N, C]: a [bn, bk] block of rows
                w = plgpu.load(w_ref.at[e, pl.ds(j * b.bn, b.bn), pl.ds(c * b.bk, b.bk)],
                               mask=col_ok[:, None] & c_ok[None, :], other=0.0)
                return acc + _dot(a, w, trans_b=True)
            w = plgpu.load(w_ref.at[e, pl.ds(c * b.bk, b.bk), pl.ds(j * b.bn, b.bn)],
                           mask=c_ok[:, None] & col_ok[None, :], other=0.0)
            return acc + _dot(a, w)

        acc = jax.lax.fori_loop(0, pl.cdiv(c_dim, b.bk), body, jnp.zeros((b.bm, b.bn), jnp.float32))
        plgpu.store(o_ref.at[rows, pl.ds(j * b.bn, b.bn)], acc.astype(o_ref.dtype), mask=col_ok[None, :])

    @pl.when(e >= num_experts)
    def _empty():
        plgpu.store(o_ref.at[rows, pl.ds(j * b.bn, b.bn)], jnp.zeros((b.bm, b.bn), o_ref.dtype),
                    mask=col_ok[None, :])


def _tile_matmul(tile_e, a, w, b: Blocks, transpose_w: bool):
    """a [T*bm, C] tiles, w [E, N, C] (transpose_w) or [E, C, N] -> [T*bm, N]."""
    n = w.shape[1] if transpose_w else w.shape[2]
    grid = (tile_e.shape[0], pl.cdiv(n, b.bn))
    return pl.pallas_call(
        functools.partial(_tile_kernel, b=b, num_experts=w.shape[0], transpose_w=transpose_w),
        out_shape=jax.ShapeDtypeStruct((a.shape[0], n), a.dtype), grid=grid,
        compiler_params=plgpu.CompilerParams(num_warps=b.num_warps, num_stages=b.num_stages),
        interpret=b.interpret, name="moe_gmm_nt" if transpose_w else "moe_gmm_nn")(tile_e, a, w)


def _dw_kernel(first_ref, count_ref, dy_ref, a_ref, o_ref, *, b: Blocks):
    """o[e, i block, j block] = sum over expert e's tiles of dy[rows, i block]^T @ a[rows, j block]."""
    e, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    n_dim, c_dim = dy_ref.shape[1], a_ref.shape[1]
    ii = i * b.bn + jnp.arange(b.bn)
    jj = j * b.bk + jnp.arange(b.bk)
    i_ok, j_ok = ii < n_dim, jj < c_dim
    first = first_ref[e]

    def body(t, acc):
        rows = pl.ds((first + t) * b.bm, b.bm)
        dy = plgpu.load(dy_ref.at[rows, pl.ds(i * b.bn, b.bn)], mask=i_ok[None, :], other=0.0)
        a = plgpu.load(a_ref.at[rows, pl.ds(j * b.bk, b.bk)], mask=j_ok[None, :], other=0.0)
        return acc + _dot(dy, a, trans_a=True)

    acc = jax.lax.fori_loop(0, count_ref[e], body, jnp.zeros((b.bn, b.bk), jnp.float32))
    plgpu.store(o_ref.at[e, pl.ds(i * b.bn, b.bn), pl.ds(j * b.bk, b.bk)], acc.astype(o_ref.dtype),
                mask=i_ok[:, None] & j_ok[None, :])


def _weight_grad(first, count, dy, a, w_shape, w_dtype, b: Blocks):
    """dy [T*bm, N], a [T*bm, C] -> dW [E, N, C] (per expert dy[rows]^T a[rows])."""
    e, n, c = w_shape
    return pl.pallas_call(
        functools.partial(_dw_kernel, b=b), out_shape=jax.ShapeDtypeStruct((e, n, c), w_dtype),
        grid=(e, pl.cdiv(n, b.bn), pl.cdiv(c, b.bk)),
        compiler_params=plgpu.CompilerParams(num_warps=b.num_warps, num_stages=b.num_stages),
        interpret=b.interpret, name="moe_gmm_dw")(first, count, dy, a)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def tiled_gmm_nt(a, w, tile_e, first, count, b_fwd: Blocks, b_bwd: Blocks):
    """Row tiles a [T*bm, C] (tile t owned by expert tile_e[t], E = none) x w [E, N, C]^T -> [T*bm, N]."""
    return _tile_matmul(tile_e, a, w, b_fwd, transpose_w=True)


def _fwd(a, w, tile_e, first, count, b_fwd, b_bwd):
    return tiled_gmm_nt(a, w, tile_e, first, count, b_fwd, b_bwd), (a, w, tile_e, first, count)


def _bwd(b_fwd, b_bwd, res, dy):
    a, w, tile_e, first, count = res
    dy = dy.astype(a.dtype)
    da = _tile_matmul(tile_e, dy, w, b_bwd, transpose_w=False)  # dy [.., N] . W[e] [N, C]
    dw = _weight_grad(first, count, dy, a, w.shape, w.dtype, b_fwd)
    return da, dw, None, None, None


tiled_gmm_nt.defvjp(_fwd, _bwd)


def expert_ffn_triton_gmm(x, idx, weights, w_gate, w_up, w_down, *, interpret: bool | None = None):
    """x [N, H], idx [N, K], weights [N, K], w_gate/w_up [E, I, H], w_down [E, H, I] -> [N, H]."""
    n, k = idx.shape
    e, inner, hdim = w_gate.shape
    m = n * k
    if interpret is None:
        interpret = platform_of() != "gpu"
    b_gu = blocks(m, e, inner, hdim, interpret)
    b_d = blocks(m, e, hdim, inner, interpret)
    with jax.named_scope("triton_gmm_dispatch"):
        lay = tile_layout(idx.reshape(-1).astype(jnp.int32), e, b_gu.bm)
        rows = lay.num_tiles * lay.tile
        src = lay.order // k
        buf = jnp.zeros((rows, hdim), x.dtype).at[lay.row].set(x[src], mode="drop")
        meta = (lay.tile_expert, lay.expert_first_tile, lay.expert_tiles)
    with jax.named_scope("triton_gmm"):
        # backward blocks: da contracts over the forward's output dim and writes the forward's contraction dim
        g = tiled_gmm_nt(buf, w_gate.astype(x.dtype), *meta, b_gu, b_d)
        u = tiled_gmm_nt(buf, w_up.astype(x.dtype), *meta, b_gu, b_d)
        y = tiled_gmm_nt(jax.nn.silu(g) * u, w_down.astype(x.dtype), *meta, b_d, b_gu)
    with jax.named_scope("triton_gmm_combine"):
        inverse = jnp.zeros_like(lay.order).at[lay.order].set(jnp.arange(m, dtype=lay.order.dtype))
        per_copy = jnp.take(y, lay.row[inverse], axis=0, mode="fill", fill_value=0).reshape(n, k, hdim)
        return jnp.sum(per_copy * weights[..., None].astype(per_copy.dtype), axis=1)

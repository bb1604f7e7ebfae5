"""`megablox`: the expert FFN on TPU with Pallas grouped matmuls (jax.experimental.pallas.ops.tpu.megablox).

Token copies are sorted by expert (rows of one expert contiguous, `group_sizes[e]` of them), padded at the end to
a whole number of row tiles, and run through three grouped matmuls (gate, up, down) that read the expert weights
in their stored [E, out, in] layout (`transpose_rhs`: the kernel contracts the weights' minor dim tile by tile;
no transposed copy of the weights is ever made). The grid visits only the row tiles of non-empty groups, so a
decode step with a few token copies reads only the selected experts' weights.

Our own VJP (`gmm_nt`): forward gmm(x, W^T); input gradient gmm(dy, W) (the same weights, not transposed);
weight gradient tgmm(dy^T, x) -> [E, out, in] directly, in the weights' layout. Rows past the routed copies
(row-tile padding, and copies routed to the sentinel id E = "no expert", used by the expert-parallel receive
buffers) come out as zeros and get zero gradient.

On a non-TPU platform the kernels run in Pallas interpret mode (slow; for tests on CPU).
Shapes: x [N, H]; idx int [N, K] (ids in 0..E, E meaning none); weights [N, K]; w_gate/w_up [E, I, H];
w_down [E, H, I].
"""

from __future__ import annotations

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp

from omni_jax.kernels.platform import platform_of

# The kernel module (the package re-exports jax's own custom_vjp `gmm` under the same name).
mblx = importlib.import_module("jax.experimental.pallas.ops.tpu.megablox.gmm")

# Tile caps (rows, contraction, output columns). VMEM per grid step with double-buffered inputs/outputs and an
# fp32 accumulator: bf16 512x1024x1024 ~ 10 MiB, under the 16 MiB default scoped VMEM of v5e/v5p (32 MiB on
# v6e); fp32 halves the column tiles. Released thinker: H=2048, I=768 -> gate/up (tk, tn) = (1024, 768),
# down (768, 1024); talker: H=1024, I=384 -> (1024, 384), (384, 1024): all divide exactly.
MAX_ROW_TILE = 512
MAX_COL_TILE = {2: 1024, 4: 512}  # by itemsize


@dataclasses.dataclass(frozen=True)
class GmmConfig:
    """Static tiles for one grouped matmul's forward and backward kernels."""

    fwd: tuple[int, int, int]  # gmm x[M,K] . W[G,N,K]^T: (tm, tk over K, tn over N)
    dlhs: tuple[int, int, int]  # gmm dy[M,N] . W[G,N,K]: (tm, tk over N, tn over K)
    dw: tuple[int, int, int]  # tgmm dy^T[N,M] . x[M,K]: (tm, tk over N, tn over K)
    interpret: bool


def col_tile(d: int, cap: int, align: int = 128) -> int:
    """The whole dim when it fits `cap`; else the largest multiple of `align` <= cap dividing it; else `cap`
    (the kernel masks the remainder)."""
    if d <= cap:
        return d
    for t in range(cap - cap % align, 0, -align):
        if d % t == 0:
            return t
    return cap


def row_tile(copies: int, num_experts: int) -> int:
    """Rows per tile: the power of two nearest below the mean group size, in [8, MAX_ROW_TILE] (a group
    straddles at most two more tiles than it fills, and a tile re-reads its expert's weights), or all rows
    (rounded up to 8) when they are fewer."""
    mean = max(copies // max(num_experts, 1), 1)
    t = 8
    while 2 * t <= min(mean, MAX_ROW_TILE):
        t *= 2
    return min(t, -(-copies // 8) * 8)


def gmm_config(m: int, k: int, n: int, itemsize: int, tm: int, interpret: bool) -> GmmConfig:
    cap = MAX_COL_TILE.get(itemsize, 512)
    tk, tn = col_tile(k, cap), col_tile(n, cap)
    tkn, tnk = col_tile(n, cap), col_tile(k, cap)
    return GmmConfig((tm, tk, tn), (tm, tkn, tnk), (tm, tkn, tnk), interpret)


def _valid_rows(m: int, group_sizes):
    return (jnp.arange(m) < jnp.sum(group_sizes))[:, None]


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def gmm_nt(lhs, rhs, group_sizes, cfg: GmmConfig):
    """Grouped lhs [M, K] (rows of group g contiguous, groups in order) x rhs [G, N, K]^T -> [M, N]; rows past
    sum(group_sizes) are 0."""
    out = mblx.gmm(lhs, rhs, group_sizes, lhs.dtype, cfg.fwd, transpose_rhs=True, interpret=cfg.interpret)
    return jnp.where(_valid_rows(lhs.shape[0], group_sizes), out, 0)


def _gmm_nt_fwd(lhs, rhs, group_sizes, cfg):
    return gmm_nt(lhs, rhs, group_sizes, cfg), (lhs, rhs, group_sizes)


def _gmm_nt_bwd(cfg, res, dy):
    lhs, rhs, group_sizes = res
    valid = _valid_rows(lhs.shape[0], group_sizes)
    dy = jnp.where(valid, dy, 0).astype(lhs.dtype)
    dlhs = mblx.gmm(dy, rhs, group_sizes, lhs.dtype, cfg.dlhs, transpose_rhs=False, interpret=cfg.interpret)
    # tgmm(a [N, M], b [M, K]) -> [G, N, K] = per group a[:, rows] @ b[rows]: the weights' own layout.
    drhs = mblx.tgmm(dy.swapaxes(0, 1), lhs, group_sizes, rhs.dtype, cfg.dw, interpret=cfg.interpret)
    return jnp.where(valid, dlhs, 0), drhs, None


gmm_nt.defvjp(_gmm_nt_fwd, _gmm_nt_bwd)


def sort_copies(idx, num_experts: int):
    """idx [N, K] -> (order [M]: copies sorted by expert, sentinel ids >= E last; group_sizes int32 [E];
    inverse [M]: position of each copy in the sorted order)."""
    flat = idx.reshape(-1).astype(jnp.int32)
    order = jnp.argsort(flat, stable=True)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # ids >= E are not counted
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    return order, sizes, inverse


def expert_ffn_megablox(x, idx, weights, w_gate, w_up, w_down, *, interpret: bool | None = None):
    """x [N, H], idx [N, K], weights [N, K], w_gate/w_up [E, I, H], w_down [E, H, I] -> [N, H]."""
    n, k = idx.shape
    e, inner, hdim = w_gate.shape
    m = n * k
    if interpret is None:
        interpret = platform_of() != "tpu"
    with jax.named_scope("megablox_dispatch"):
        order, sizes, inverse = sort_copies(idx, e)
        tm = row_tile(m, e)
        m_pad = -(-m // tm) * tm
        src = jnp.pad(order // k, (0, m_pad - m))  # padding rows: any token, outside every group
        tokens = x[src]
    isz = jnp.dtype(x.dtype).itemsize
    cfg_gu = gmm_config(m_pad, hdim, inner, isz, tm, interpret)
    cfg_d = gmm_config(m_pad, inner, hdim, isz, tm, interpret)
    with jax.named_scope("megablox_gmm"):
        g = gmm_nt(tokens, w_gate.astype(x.dtype), sizes, cfg_gu)
        u = gmm_nt(tokens, w_up.astype(x.dtype), sizes, cfg_gu)
        y = gmm_nt(jax.nn.silu(g) * u, w_down.astype(x.dtype), sizes, cfg_d)  # [M_pad, H]
    with jax.named_scope("megablox_combine"):
        per_copy = y[inverse].reshape(n, k, hdim)
        return jnp.sum(per_copy * weights[..., None].astype(per_copy.dtype), axis=1)

"""Pure-JAX expert FFN implementations (SiLU-gated experts), all computing the same function:

    y[n] = sum_k weights[n, k] * down_e( silu(x[n] @ gate_e) * (x[n] @ up_e) ),   e = idx[n, k]

- `expert_ffn_sorted`: token copies sorted by expert, grouped matmul with `jax.lax.ragged_dot` (prefill/training).
- `expert_ffn_tiled`: token copies sorted by expert into fixed-size row tiles, each tile owned by one expert, then
  one batched matmul over tiles (megablox's layout in plain XLA; the CPU prefill path, where XLA's `ragged_dot`
  is dense over all experts).
- `expert_ffn_bucketed`: token copies scattered into a per-expert buffer [E, C, H] and one batched matmul against
  the expert weights as they lie (no weight gather), with the capacity C picked at run time from a few static
  levels (`lax.switch`) as the smallest that holds the largest group; a group too large for every level runs the
  tiled path. Exact (no token is dropped); the CPU/GPU prefill path.
- `expert_ffn_slices`: per token copy, the selected expert's weights read in place (`dynamic_index_in_dim`), no
  gathered copy of them; unrolled over the few copies of a decode step.
- `expert_ffn_gather`: gathers only the selected experts' weights per token, gate and up stacked into one
  buffer, then two batched matrix-vector products whose contraction runs along the weights' contiguous (minor)
  dimension (the decode path: one gather and two dots per layer, whatever top-k is).
- `expert_ffn_dense`: every expert on every token, masked combine. Test oracle only.

Shapes: x [N, H]; idx int [N, K]; weights [N, K] (activation dtype); w_gate, w_up [E, I, H]; w_down [E, H, I]
(torch's Linear layout [out, in] per expert, as the checkpoints store them: a token's matrix-vector products read
each weight row contiguously, which is what makes decode fast on CPU; grouped matmuls contract the minor dim).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def _combine(per_copy, weights, n, k):
    """per_copy: [N*K, H] in token-major order -> weighted sum over K in the activation dtype."""
    per_copy = per_copy.reshape(n, k, -1)
    return jnp.sum(per_copy * weights[..., None].astype(per_copy.dtype), axis=1)


_RAGGED_NT = jax.lax.RaggedDotDimensionNumbers(
    dot_dimension_numbers=(([1], [2]), ([], [])), lhs_ragged_dimensions=[0], rhs_group_dimensions=[0])


def _ragged_nt(lhs, rhs, group_sizes):
    """Grouped matmul lhs [M, K] (rows grouped) x rhs [G, N, K] (contracting rhs's minor dim) -> [M, N]."""
    return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, _RAGGED_NT)


def expert_ffn_sorted(x, idx, weights, w_gate, w_up, w_down):
    n, k = idx.shape
    e = w_gate.shape[0]
    flat_idx = idx.reshape(-1)
    order = jnp.argsort(flat_idx, stable=True)
    tokens = jnp.repeat(x, k, axis=0)[order]  # [N*K, H], grouped by expert
    group_sizes = jnp.bincount(flat_idx, length=e).astype(jnp.int32)
    g = _ragged_nt(tokens, w_gate.astype(x.dtype), group_sizes)
    u = _ragged_nt(tokens, w_up.astype(x.dtype), group_sizes)
    h = jax.nn.silu(g) * u
    out_sorted = _ragged_nt(h, w_down.astype(x.dtype), group_sizes)
    out = jnp.zeros_like(out_sorted).at[order].set(out_sorted)
    return _combine(out, weights, n, k)


def expert_ffn_gather(x, idx, weights, w_gate, w_up, w_down):
    n, k = idx.shape
    gu = jnp.stack([w_gate[idx], w_up[idx]], axis=2).astype(x.dtype)  # [N, K, 2, I, H]: one gather buffer
    gu = jnp.einsum("NKTIH,NH->NKTI", gu, x)
    h = jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1]
    out = jnp.einsum("NKHI,NKI->NKH", w_down[idx].astype(x.dtype), h)
    return jnp.sum(out * weights[..., None].astype(out.dtype), axis=1)


def _nt(a, w):
    """a [M, K] x w [N, K] (torch Linear layout) -> [M, N]."""
    return jax.lax.dot_general(a, w, (((1,), (1,)), ((), ())))


def expert_ffn_slices(x, idx, weights, w_gate, w_up, w_down):
    n, k = idx.shape
    rows = []
    for i in range(n):
        xi = x[i:i + 1]
        acc = None
        for j in range(k):
            e = idx[i, j]
            g = _nt(xi, jax.lax.dynamic_index_in_dim(w_gate, e, keepdims=False).astype(x.dtype))
            u = _nt(xi, jax.lax.dynamic_index_in_dim(w_up, e, keepdims=False).astype(x.dtype))
            y = _nt(jax.nn.silu(g) * u, jax.lax.dynamic_index_in_dim(w_down, e, keepdims=False).astype(x.dtype))
            y = y * weights[i, j].astype(y.dtype)
            acc = y if acc is None else acc + y
        rows.append(acc)
    return jnp.concatenate(rows, axis=0)


def expert_ffn_dense(x, idx, weights, w_gate, w_up, w_down):
    g = jnp.einsum("NH,EIH->NEI", x, w_gate.astype(x.dtype))
    u = jnp.einsum("NH,EIH->NEI", x, w_up.astype(x.dtype))
    out = jnp.einsum("NEI,EHI->NEH", jax.nn.silu(g) * u, w_down.astype(x.dtype))  # [N, E, H]
    sel = jnp.take_along_axis(out, idx[..., None], axis=1)  # [N, K, H]
    return jnp.sum(sel * weights[..., None].astype(sel.dtype), axis=1)


def tile_rows(num_copies: int, num_experts: int) -> int:
    """Row-tile size: about half the mean group size (padding waste vs loop trips), a power of two in [8, 256]."""
    t = 8
    while t < 256 and 2 * t < num_copies // max(num_experts, 1):
        t *= 2
    return t


class TileLayout(NamedTuple):
    """Token copies sorted by expert into row tiles of `tile` rows, each tile owned by one expert (its group padded
    to whole tiles). Copies with an id >= E (no expert) get no row."""

    order: jax.Array  # [M] copies in expert order
    row: jax.Array  # [M] padded row of each sorted copy (num_tiles * tile for a copy with no expert)
    tile_expert: jax.Array  # [num_tiles] owner of each tile; E for tiles past the last group
    expert_first_tile: jax.Array  # [E]
    expert_tiles: jax.Array  # [E] tiles per expert (0 for an expert with no copy)
    num_tiles: int  # static bound: every group padded to a whole number of tiles
    tile: int


def tile_layout(flat_idx, num_experts: int, tile: int) -> TileLayout:
    """flat_idx int [M] (expert of each token copy, E for none) -> TileLayout."""
    m, e, t = flat_idx.shape[0], num_experts, tile
    num_tiles = -(-(m + e * (t - 1)) // t)
    order = jnp.argsort(flat_idx, stable=True)
    sorted_e = flat_idx[order]
    sizes = jnp.bincount(flat_idx, length=e)  # ids >= E are not counted
    tiles = (sizes + t - 1) // t
    first_tile = jnp.cumsum(tiles) - tiles
    first = jnp.cumsum(sizes) - sizes  # unpadded start of each expert in the sorted order
    ec = jnp.minimum(sorted_e, e - 1)
    row = jnp.where(sorted_e < e, first_tile[ec] * t + (jnp.arange(m) - first[ec]), num_tiles * t)
    tile_e = jnp.searchsorted(jnp.cumsum(tiles), jnp.arange(num_tiles), side="right")
    return TileLayout(order, row, tile_e.astype(jnp.int32), first_tile.astype(jnp.int32),
                      tiles.astype(jnp.int32), num_tiles, t)


def expert_ffn_tiled(x, idx, weights, w_gate, w_up, w_down, tile: int | None = None, _per_copy: bool = False):
    n, k = idx.shape
    e = w_gate.shape[0]
    m = n * k
    lay = tile_layout(idx.reshape(-1), e, tile or tile_rows(m, e))
    order, row, t, num_tiles = lay.order, lay.row, lay.tile, lay.num_tiles
    tokens = jnp.repeat(x, k, axis=0)[order]
    buf = jnp.zeros((num_tiles * t, x.shape[1]), x.dtype).at[row].set(tokens, mode="drop")
    tile_e = jnp.minimum(lay.tile_expert, e - 1)
    xt = buf.reshape(num_tiles, t, -1)

    def tile_ffn(args):
        # One tile, one expert: index the expert's weights in place (no [tiles, H, I] gather is materialised;
        # XLA CPU runs batched matmuls over gathered weights far slower than this loop).
        xx, ex = args
        g = _nt(xx, w_gate[ex].astype(x.dtype))
        u = _nt(xx, w_up[ex].astype(x.dtype))
        return _nt(jax.nn.silu(g) * u, w_down[ex].astype(x.dtype))

    out = jax.lax.map(tile_ffn, (xt, tile_e))
    out_sorted = jnp.take(out.reshape(num_tiles * t, -1), row, axis=0, mode="fill", fill_value=0)
    per_copy = jnp.zeros_like(out_sorted).at[order].set(out_sorted)
    if _per_copy:  # [N*K, H] unweighted, token-major (expert_ffn_bucketed's fallback)
        return per_copy
    return _combine(per_copy, weights, n, k)


def capacity_levels(num_copies: int, num_experts: int) -> tuple[int, ...]:
    """Static per-expert capacities tried in order: 1.25x, 1.5x, 2x and 3x the mean group size (multiples of 8),
    none above the copy count (a capacity of `num_copies` can hold any routing)."""
    mean = -(-num_copies // max(num_experts, 1))
    levels = []
    for f in (1.25, 1.5, 2.0, 3.0):
        c = min(-(-int(mean * f) // 8) * 8, num_copies)
        if not levels or c > levels[-1]:
            levels.append(c)
    return tuple(levels)


def expert_ffn_bucketed(x, idx, weights, w_gate, w_up, w_down, levels: tuple[int, ...] | None = None):
    n, k = idx.shape
    e = w_gate.shape[0]
    m = n * k
    levels = levels or capacity_levels(m, e)
    flat_idx = idx.reshape(-1)
    order = jnp.argsort(flat_idx, stable=True)
    sorted_e = flat_idx[order]
    sizes = jnp.bincount(flat_idx, length=e)
    first = jnp.cumsum(sizes) - sizes
    slot = jnp.arange(m) - first[sorted_e]  # rank of each sorted copy inside its expert's group
    token = order // k  # the token each sorted copy comes from

    def at_capacity(cap):
        def run(_):
            dest = sorted_e * cap + slot
            buf = jnp.zeros((e * cap, x.shape[1]), x.dtype).at[dest].set(x[token])
            xb = buf.reshape(e, cap, -1)
            # weights on the left (W @ X^T per expert, [E, I, C]): on XLA:CPU ~25% faster than X @ W^T
            g = jnp.einsum("EIH,ECH->EIC", w_gate.astype(x.dtype), xb)
            u = jnp.einsum("EIH,ECH->EIC", w_up.astype(x.dtype), xb)
            y = jnp.einsum("EHI,EIC->ECH", w_down.astype(x.dtype), jax.nn.silu(g) * u).reshape(e * cap, -1)
            return jnp.zeros((m, x.shape[1]), x.dtype).at[order].set(y[dest])
        return run

    def fallback(_):  # a group larger than every level: exact row tiles
        return expert_ffn_tiled(x, idx, weights, w_gate, w_up, w_down, _per_copy=True)

    branches = [at_capacity(c) for c in levels] + [fallback]
    choice = jnp.searchsorted(jnp.asarray(levels, jnp.int32), jnp.max(sizes).astype(jnp.int32), side="left")
    per_copy = jax.lax.switch(choice, branches, None)
    return _combine(per_copy, weights, n, k)

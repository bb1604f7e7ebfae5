"""The vision encoder: a Qwen3-VL style ViT with a 2x2 patch merger and DeepStack mergers (reference spec §5.3).

Attribute names mirror the checkpoint (`thinker.visual.*`): patch_embed.proj, pos_embed, blocks.N.{norm1, norm2,
attn.qkv, attn.proj, mlp.linear_fc1, mlp.linear_fc2}, merger.{ln_q, mlp.0, mlp.2}, merger_list.J.{...}. The
merger MLP is an `nnx.List` [Linear, GELU, Linear] like the reference's `nn.ModuleList`, so `merger.mlp.0.weight`
maps to our `merger.mlp.0.kernel` with a plain transpose. The patch-embedding kernel is kept 5-D
[C, T, P, P, hidden] (the torch Conv3d weight with its output axis moved last), which makes the checkpoint
transform invertible without knowing the patch shape (see checkpoint/keys_vision.py).

`grid_thw` is static (a tuple of (t, h, w) tuples): all position tables (pos-embed interpolation taps, 2-D RoPE
coordinates) are built in numpy at trace time, and attention runs per temporal frame of each image/video with no
attention across frames or items. Frames of equal size are batched together ([frames, h*w, heads, head_dim]), so
no [N, N] mask is ever built (AttentionMask(): each frame is its own batch row, the block-diagonal mask of the
reference's cu_seqlens without any cross-frame work); tokens are permuted once so that each size group is
contiguous, and the merger outputs are permuted back.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni_jax.config import VisionEncoderConfig
from omni_jax.errors import OmniJaxError
from omni_jax.kernels.attention import AttentionMask, attention
from omni_jax.layers.core import Embed, LayerNorm, Linear, gelu_exact, gelu_tanh, param

GridTHW = tuple[tuple[int, int, int], ...]

LN_EPS = 1e-6  # every vision LayerNorm


class VisionGridError(OmniJaxError):
    """A grid_thw the encoder cannot run (sizes that do not match pixel_values or the merge size)."""


# ---------------------------------------------------------------------------------------------------------------
# Static (numpy) tables built from grid_thw


def _merge_order_coords(h: int, w: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """(row, col) of each patch of an h x w grid in merge-block order (block_row, block_col, in_row, in_col)."""
    r = np.arange(h).reshape(h // m, m, 1, 1)
    c = np.arange(w).reshape(1, 1, w // m, m)
    rows = np.broadcast_to(r, (h // m, m, w // m, m)).transpose(0, 2, 1, 3).reshape(-1)
    cols = np.broadcast_to(c, (h // m, m, w // m, m)).transpose(0, 2, 1, 3).reshape(-1)
    return rows, cols


def _interp_axis(index: np.ndarray, size: int, side: int) -> tuple[np.ndarray, np.ndarray]:
    """align_corners=True bilinear taps/weights [n, 2] into a `side`-long table for positions 0..size-1.

    float32 throughout, in the reference's operation order, so the weights are bit-identical.
    """
    src = index.astype(np.float32) * np.float32(side - 1) / np.float32(max(size - 1, 1))
    floor = np.floor(src)
    offsets = np.arange(2, dtype=np.float32)
    taps = np.clip(floor.astype(np.int64)[:, None] + np.arange(2), 0, side - 1)
    weights = np.maximum(np.float32(1) - np.abs(src[:, None] - floor[:, None] - offsets), np.float32(0))
    return taps, weights.astype(np.float32)


@functools.lru_cache(maxsize=64)
def vision_tables(grid_thw: GridTHW, merge: int, side: int) -> dict[str, np.ndarray]:
    """Per-patch tables in the encoder's token order (= the processor's patch order).

    rows/cols int32 [N] (RoPE coordinates), pos_idx int32 [N, 4] and pos_w float32 [N, 4] (bilinear taps into
    the side x side pos-embed table), seg_lens: the attention segment (one temporal frame) lengths in order.
    """
    rows, cols, idx, wts, seg_lens = [], [], [], [], []
    for t, h, w in grid_thw:
        r, c = _merge_order_coords(h, w, merge)
        ht, hw_ = _interp_axis(r, h, side)
        wt, ww = _interp_axis(c, w, side)
        i = (ht[:, :, None] * side + wt[:, None, :]).reshape(-1, 4)
        wgt = (hw_[:, :, None] * ww[:, None, :]).reshape(-1, 4)
        for _ in range(t):
            rows.append(r)
            cols.append(c)
            idx.append(i)
            wts.append(wgt)
            seg_lens.append(h * w)
    return {"rows": np.concatenate(rows).astype(np.int32), "cols": np.concatenate(cols).astype(np.int32),
            "pos_idx": np.concatenate(idx).astype(np.int32), "pos_w": np.concatenate(wts),
            "seg_lens": np.asarray(seg_lens)}


@functools.lru_cache(maxsize=64)
def segment_layout(seg_lens: tuple[int, ...]) -> tuple[np.ndarray | None, tuple[tuple[int, int], ...]]:
    """Group equal-length segments: (token permutation or None if identity, ((n_segments, length), ...)).

    After permuting tokens with `perm`, each group is a contiguous run of n_segments * length tokens.
    """
    starts = np.concatenate([[0], np.cumsum(seg_lens)[:-1]]).astype(np.int64)
    order = sorted(range(len(seg_lens)), key=lambda s: (seg_lens[s], s))  # stable by length
    perm = np.concatenate([np.arange(starts[s], starts[s] + seg_lens[s]) for s in order])
    groups: list[list[int]] = []
    for s in order:
        if groups and groups[-1][1] == seg_lens[s]:
            groups[-1][0] += 1
        else:
            groups.append([1, seg_lens[s]])
    identity = bool(np.array_equal(perm, np.arange(perm.size)))
    return (None if identity else perm), tuple((n, ln) for n, ln in groups)


def check_grid(grid_thw, n_patches: int, merge: int) -> GridTHW:
    try:
        grid = tuple(tuple(int(v) for v in g) for g in grid_thw)
    except TypeError as e:
        raise VisionGridError(f"grid_thw must be a sequence of (t, h, w), got {grid_thw!r}") from e
    if not grid or any(len(g) != 3 or min(g) <= 0 for g in grid):
        raise VisionGridError(f"grid_thw must be a non-empty sequence of positive (t, h, w), got {grid!r}")
    for t, h, w in grid:
        if h % merge or w % merge:
            raise VisionGridError(f"grid (t={t}, h={h}, w={w}) is not divisible by spatial_merge_size={merge}")
    total = sum(t * h * w for t, h, w in grid)
    if total != n_patches:
        raise VisionGridError(f"grid_thw {grid} describes {total} patches but pixel_values has {n_patches} rows")
    return grid


# ---------------------------------------------------------------------------------------------------------------
# Modules


class PatchProj(nnx.Module):
    """The Conv3d weight [hidden, C, T, P, P] stored as kernel [C, T, P, P, hidden], and its bias."""

    def __init__(self, cfg: VisionEncoderConfig, *, dtype, rngs: nnx.Rngs):
        c, t, p = cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size
        self.kernel = param(rngs, (c, t, p, p, cfg.hidden_size), ("conv_in", "kernel", "kernel", "kernel", "embed"),
                            dtype)
        self.bias = param(rngs, (cfg.hidden_size,), ("embed",), dtype, init="zeros")


class PatchEmbed(nnx.Module):
    """Conv3d with kernel = stride = (T, P, P) on one patch = a linear map of the flattened (C, T, P, P) vector."""

    def __init__(self, cfg: VisionEncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.proj = PatchProj(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        """x: [N, C*T*P*P] -> [N, hidden]."""
        k = self.proj.kernel[...]
        k = k.reshape(-1, k.shape[-1])
        return jnp.einsum("ni,io->no", x, k.astype(x.dtype)) + self.proj.bias[...].astype(x.dtype)


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VisionEncoderConfig, *, dtype, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.head_dim = d // cfg.num_heads
        self.qkv = Linear(d, 3 * d, ("embed", "heads"), use_bias=True, dtype=dtype, rngs=rngs)
        self.proj = Linear(d, d, ("heads", "embed"), use_bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, groups, impl: str = "auto"):
        """x: [N, D] (tokens grouped by segment length); cos/sin fp32 [N, head_dim]; groups ((n_seg, len), ...)."""
        n = x.shape[0]
        qkv = self.qkv(x).reshape(n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        # RoPE in fp32 (deliberate: the reference upcasts q, k, cos, sin), cast back to the activation dtype.
        q = _rope(q, cos, sin).astype(x.dtype)
        k = _rope(k, cos, sin).astype(x.dtype)
        outs, off = [], 0
        for n_seg, length in groups:
            sl = slice(off, off + n_seg * length)
            shape = (n_seg, length, self.num_heads, self.head_dim)
            o = attention(q[sl].reshape(shape), k[sl].reshape(shape), v[sl].reshape(shape),
                          AttentionMask(), scale=self.head_dim ** -0.5, impl=impl)
            outs.append(o.reshape(n_seg * length, -1))
            off += n_seg * length
        out = outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
        return self.proj(out)


def _rope(x, cos, sin):
    xf = x.astype(jnp.float32)
    h = xf.shape[-1] // 2
    rot = jnp.concatenate([-xf[..., h:], xf[..., :h]], axis=-1)
    return xf * cos[:, None, :] + rot * sin[:, None, :]


class VisionMLP(nnx.Module):
    def __init__(self, cfg: VisionEncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.linear_fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), use_bias=True,
                                 dtype=dtype, rngs=rngs)
        self.linear_fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), use_bias=True,
                                 dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.linear_fc2(gelu_tanh(self.linear_fc1(x)))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VisionEncoderConfig, *, dtype, rngs: nnx.Rngs):
        self.norm1 = LayerNorm(cfg.hidden_size, LN_EPS, dtype=dtype, rngs=rngs)
        self.norm2 = LayerNorm(cfg.hidden_size, LN_EPS, dtype=dtype, rngs=rngs)
        self.attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)
        self.mlp = VisionMLP(cfg, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, groups, attention_impl: str = "auto"):
        x = x + self.attn(self.norm1(x), cos, sin, groups, attention_impl)
        return x + self.mlp(self.norm2(x))


class Gelu(nnx.Module):
    """Exact (erf) GELU as a parameter-free list entry, standing where the reference's nn.GELU() sits."""

    def __call__(self, x):
        return gelu_exact(x)


class PatchMerger(nnx.Module):
    """2x2 spatial merge: ln_q -> [N/4, 4*hidden] -> mlp.0 -> GELU -> mlp.2.

    postshuffle=False (final merger): LayerNorm over each patch (hidden) before grouping 4 patches.
    postshuffle=True (DeepStack mergers): group first, then LayerNorm over the 4*hidden vector.
    """

    def __init__(self, cfg: VisionEncoderConfig, postshuffle: bool, *, dtype, rngs: nnx.Rngs):
        self.width = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.postshuffle = postshuffle
        self.ln_q = LayerNorm(self.width if postshuffle else cfg.hidden_size, LN_EPS, dtype=dtype, rngs=rngs)
        self.mlp = nnx.List([
            Linear(self.width, self.width, (None, "mlp"), use_bias=True, dtype=dtype, rngs=rngs),
            Gelu(),
            Linear(self.width, cfg.out_hidden_size, ("mlp", "embed"), use_bias=True, dtype=dtype, rngs=rngs),
        ])

    def __call__(self, x):
        """x: [N, hidden] -> [N/4, out_hidden]."""
        if self.postshuffle:
            x = self.ln_q(x.reshape(-1, self.width))
        else:
            x = self.ln_q(x).reshape(-1, self.width)
        for layer in self.mlp:
            x = layer(x)
        return x


class VisionEncoder(nnx.Module):
    """pixel_values [N, C*T*P*P] + static grid_thw -> (merged [N/4, out_hidden], [deepstack [N/4, out_hidden]])."""

    def __init__(self, cfg: VisionEncoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if cfg.hidden_act != "gelu_pytorch_tanh":
            raise ValueError(f"vision hidden_act {cfg.hidden_act!r} is not supported (only 'gelu_pytorch_tanh')")
        self.cfg = cfg
        self.side = int(round(cfg.num_position_embeddings ** 0.5))
        self.patch_embed = PatchEmbed(cfg, dtype=dtype, rngs=rngs)
        self.pos_embed = Embed(cfg.num_position_embeddings, cfg.hidden_size, (None, "embed"), dtype=dtype, rngs=rngs)
        self.blocks = nnx.List([VisionBlock(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.depth)])
        self.merger = PatchMerger(cfg, postshuffle=False, dtype=dtype, rngs=rngs)
        self.merger_list = nnx.List([PatchMerger(cfg, postshuffle=True, dtype=dtype, rngs=rngs)
                                     for _ in cfg.deepstack_visual_indexes])

    def __call__(self, pixel_values, grid_thw, attention_impl: str = "auto") -> tuple[jax.Array, list[jax.Array]]:
        """pixel_values: [N, C*T*P*P] in the processor's patch order; grid_thw: static ((t, h, w), ...).

        Returns the merger output [N/4, out_hidden] (what replaces the image/video tokens) and one DeepStack
        feature set [N/4, out_hidden] per entry of deepstack_visual_indexes, in block order.
        Computation runs in the parameter dtype (the reference casts pixel_values to the patch-embed dtype).
        """
        cfg = self.cfg
        m = cfg.spatial_merge_size
        grid = check_grid(grid_thw, pixel_values.shape[0], m)
        tab = vision_tables(grid, m, self.side)
        perm, groups = segment_layout(tuple(int(s) for s in tab["seg_lens"]))
        if perm is not None:  # make each group of equal-size frames contiguous; undone on the merged outputs
            tab = {k: v[perm] for k, v in tab.items() if k != "seg_lens"}
            pixel_values = jnp.take(pixel_values, jnp.asarray(perm), axis=0)
            block_perm = perm.reshape(-1, m * m)[:, 0] // (m * m)
            unperm = jnp.asarray(np.argsort(block_perm))

        with jax.named_scope("patch_embed"):
            dtype = self.patch_embed.proj.kernel[...].dtype
            x = self.patch_embed(pixel_values.astype(dtype))
        with jax.named_scope("pos_embed"):
            # Bilinear resampling of the learned grid; weights and the weighted sum in fp32 (as the reference).
            table = self.pos_embed.embedding[...]
            table = table.astype(jnp.promote_types(table.dtype, jnp.float32))
            idx, w = jnp.asarray(tab["pos_idx"]), jnp.asarray(tab["pos_w"])
            pos = sum(jnp.take(table, idx[:, j], axis=0) * w[:, j, None] for j in range(4))
            x = x + pos.astype(x.dtype)
        with jax.named_scope("rope"):
            # 2-D axial RoPE angles in fp32: [h, w, h, w] blocks of head_dim/4 frequencies each.
            head_dim = cfg.hidden_size // cfg.num_heads
            inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, head_dim // 2, 2, dtype=jnp.float32) / (head_dim // 2)))
            a_h = jnp.asarray(tab["rows"]).astype(jnp.float32)[:, None] * inv
            a_w = jnp.asarray(tab["cols"]).astype(jnp.float32)[:, None] * inv
            ang = jnp.concatenate([a_h, a_w, a_h, a_w], axis=-1)
            cos, sin = jnp.cos(ang), jnp.sin(ang)

        deepstack = []
        idxs = list(cfg.deepstack_visual_indexes)
        for i, blk in enumerate(self.blocks):
            with jax.named_scope(f"block_{i}"):
                x = blk(x, cos, sin, groups, attention_impl)
            if i in idxs:
                with jax.named_scope(f"deepstack_merger_{idxs.index(i)}"):
                    deepstack.append(self.merger_list[idxs.index(i)](x))
        with jax.named_scope("merger"):
            merged = self.merger(x)
        if perm is not None:
            merged = jnp.take(merged, unperm, axis=0)
            deepstack = [jnp.take(d, unperm, axis=0) for d in deepstack]
        return merged, deepstack

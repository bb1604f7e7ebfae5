"""Attention masks described as data: `AttentionMask`, a small pytree that every implementation reads.

No implementation but the XLA reference ever builds the [B, T, S] boolean; the Pallas kernels evaluate the same
rule per block from positions and ids. Query row i of batch row b sits at key position `qpos = i + q_offset[b]`
(q_offset 0 = queries and keys start together, as in prefill; chunked prefill and decode pass the number of
cached tokens before the first query). Key j is visible to query i iff all of these hold:

    j < kv_lengths[b]                          (kv_lengths: live keys per row; None = all S keys)
    j <= qpos                                  (causal)
    j > qpos - window                          (window: a causal sliding window of `window` keys, incl. itself)
    q_segment_ids[b, i] == kv_segment_ids[b, j]  (segment ids: packed sequences, per-image blocks, windows)

A query that sees no key returns zeros (and gets zero gradients). How each model part says its mask:
  thinker / talker prefill and training   AttentionMask(causal=True[, q_segment_ids=s, kv_segment_ids=s])
  decode over a KV cache                  AttentionMask(causal=True, q_offset=write_idx, kv_lengths=write_idx + T)
  code predictor                          the same as thinker/talker (prefill of 2 rows, then single steps)
  vision encoder (per-frame blocks)       frames of equal size batched as rows: AttentionMask() per group, or
                                          block_diagonal(lengths) over a packed row (cu_seqlens as segment ids)
  audio encoder (fixed windows)           windows batched as rows: AttentionMask(kv_lengths=valid tokens per window)
  Code2Wav                                AttentionMask(causal=True, window=sliding_window)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.errors import OmniJaxError


class AttentionMaskError(OmniJaxError):
    """An attention mask that does not fit the attention call (shapes, missing ids, bad window)."""


@jax.tree_util.register_pytree_node_class
@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """The mask rule of one attention call (see the module docstring).

    causal: bool (static). window: int or None (static; needs causal). q_offset: a Python int (static: kernels
    can skip masked blocks at trace time) or int [B] / scalar array (per-row, traced). q_segment_ids int [B, T] and
    kv_segment_ids int [B, S]: both or neither. kv_lengths: int [B] or None.
    """

    causal: bool = False
    window: int | None = None
    q_offset: int | jax.Array = 0
    q_segment_ids: jax.Array | None = None
    kv_segment_ids: jax.Array | None = None
    kv_lengths: jax.Array | None = None

    def __post_init__(self):
        if self.window is not None:
            if not self.causal:
                raise AttentionMaskError("AttentionMask(window=...) is a causal sliding window: set causal=True")
            if int(self.window) < 1:
                raise AttentionMaskError(f"AttentionMask window must be >= 1, got {self.window}")
        if (self.q_segment_ids is None) != (self.kv_segment_ids is None):
            raise AttentionMaskError("AttentionMask needs both q_segment_ids and kv_segment_ids, or neither")

    # -- pytree: causal, window and a Python-int q_offset are static; arrays are leaves ------------------------
    def tree_flatten(self):
        static_offset = isinstance(self.q_offset, (int, np.integer))
        children = (None if static_offset else self.q_offset, self.q_segment_ids, self.kv_segment_ids,
                    self.kv_lengths)
        return children, (self.causal, self.window, int(self.q_offset) if static_offset else None)

    @classmethod
    def tree_unflatten(cls, aux, children):
        causal, window, static_offset = aux
        offset, q_seg, kv_seg, kv_len = children
        obj = object.__new__(cls)  # skip validation: leaves may be tracers or placeholders under transformations
        for name, value in (("causal", causal), ("window", window),
                            ("q_offset", static_offset if static_offset is not None else offset),
                            ("q_segment_ids", q_seg), ("kv_segment_ids", kv_seg), ("kv_lengths", kv_len)):
            object.__setattr__(obj, name, value)
        return obj

    # -- constructors ------------------------------------------------------------------------------------------
    @classmethod
    def segments(cls, segment_ids, *, causal: bool = False, window: int | None = None) -> AttentionMask:
        """Self-attention within segments: int [B, T] ids for queries and keys alike (packed sequences)."""
        return cls(causal=causal, window=window, q_segment_ids=segment_ids, kv_segment_ids=segment_ids)

    @classmethod
    def decode(cls, start, num_new: int = 1, *, window: int | None = None) -> AttentionMask:
        """New tokens written at cache positions start[b] .. start[b] + num_new - 1 attend causally over the cache;
        keys past the last new token are never read (kv_lengths)."""
        start = jnp.asarray(start, jnp.int32)
        return cls(causal=True, window=window, q_offset=start, kv_lengths=start + num_new)

    @property
    def has_segments(self) -> bool:
        return self.q_segment_ids is not None

    @property
    def static_offset(self) -> bool:
        return isinstance(self.q_offset, (int, np.integer))

    # -- checks and the rule itself ----------------------------------------------------------------------------
    def check(self, b: int, t: int, s: int) -> None:
        """Raise AttentionMaskError unless the arrays fit a [B, T] x [B, S] attention."""
        def fits(name, x, shape):
            if x is not None and tuple(jnp.shape(x)) not in (shape, (1,) + shape[1:]):
                raise AttentionMaskError(f"AttentionMask.{name} has shape {tuple(jnp.shape(x))}; expected "
                                         f"{shape} for batch {b}, {t} queries, {s} keys")
        fits("q_segment_ids", self.q_segment_ids, (b, t))
        fits("kv_segment_ids", self.kv_segment_ids, (b, s))
        fits("kv_lengths", self.kv_lengths, (b,))
        if not self.static_offset and jnp.ndim(self.q_offset) not in (0, 1):
            raise AttentionMaskError(f"AttentionMask.q_offset must be an int, a scalar or int [B]; got shape "
                                     f"{jnp.shape(self.q_offset)}")
        fits("q_offset", None if self.static_offset or jnp.ndim(self.q_offset) == 0 else self.q_offset, (b,))

    def per_row(self, b: int):
        """(q_offset int32 [B], kv_lengths int32 [B] or None) broadcast over the batch."""
        off = jnp.broadcast_to(jnp.asarray(self.q_offset, jnp.int32), (b,))
        kv_len = None if self.kv_lengths is None else jnp.broadcast_to(jnp.asarray(self.kv_lengths, jnp.int32), (b,))
        return off, kv_len

    def rule(self, qpos, kpos, kv_len=None, q_seg=None, kv_seg=None):
        """The visibility rule on broadcastable arrays (used by the reference and inside the kernels alike):
        qpos int [..., Tq, 1] query positions (row index + q_offset), kpos int [..., 1, Sk] key positions,
        kv_len int broadcastable (or None), q_seg / kv_seg segment ids broadcastable (or None). -> bool."""
        ok = jnp.ones(jnp.broadcast_shapes(jnp.shape(qpos), jnp.shape(kpos)), bool)
        if kv_len is not None:
            ok &= kpos < kv_len
        if self.causal:
            ok &= kpos <= qpos
        if self.window is not None:
            ok &= kpos > qpos - self.window
        if q_seg is not None:
            ok &= q_seg == kv_seg
        return ok

    def dense(self, b: int, t: int, s: int) -> jax.Array:
        """The boolean bool [B, T, S] (True = attend). For the XLA reference only."""
        self.check(b, t, s)
        off, kv_len = self.per_row(b)
        q_seg = kv_seg = None
        if self.has_segments:
            q_seg = jnp.broadcast_to(self.q_segment_ids, (b, t))[:, :, None]
            kv_seg = jnp.broadcast_to(self.kv_segment_ids, (b, s))[:, None, :]
        qpos = jnp.arange(t)[None, :, None] + off[:, None, None]
        return self.rule(qpos, jnp.arange(s)[None, None, :], None if kv_len is None else kv_len[:, None, None],
                         q_seg, kv_seg)

    def key_range(self, b: int, t: int, s: int):
        """Per row, the half-open key interval [lo, hi) that any query of the row may see: (lo, hi) int32 [B].
        Segment ids are not taken into account (they only narrow it further)."""
        off, kv_len = self.per_row(b)
        hi = jnp.full((b,), s, jnp.int32) if kv_len is None else jnp.minimum(kv_len, s)
        if self.causal:
            hi = jnp.minimum(hi, off + t)
        lo = jnp.zeros((b,), jnp.int32)
        if self.window is not None:
            lo = jnp.maximum(lo, off - self.window + 1)
        return lo, jnp.maximum(hi, lo)

    def rows_with_keys(self, b: int, t: int, s: int) -> jax.Array:
        """bool [B, T]: which queries see at least one key. Without segment ids this is O(T) interval arithmetic;
        with them, a fused any-reduction over keys (no [T, S] buffer once XLA fuses it)."""
        off, kv_len = self.per_row(b)
        qpos = jnp.arange(t)[None, :] + off[:, None]
        hi = jnp.full((b, t), s, jnp.int32) if kv_len is None else jnp.broadcast_to(jnp.minimum(kv_len, s)[:, None],
                                                                                       (b, t))
        if self.causal:
            hi = jnp.minimum(hi, qpos + 1)
        lo = jnp.zeros((b, t), jnp.int32) if self.window is None else jnp.maximum(qpos - self.window + 1, 0)
        if not self.has_segments:
            return lo < hi
        return jnp.any(self.dense(b, t, s), axis=-1)


def block_diagonal(lengths, total: int | None = None) -> jax.Array:
    """Segment ids int32 [1, total] for consecutive blocks of the given lengths (cu_seqlens as segment ids);
    positions past sum(lengths) get id -1 (padding: they see only each other)."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum()) if total is None else total
    ids = np.full((total,), -1, np.int32)
    ids[: int(lengths.sum())] = np.repeat(np.arange(len(lengths), dtype=np.int32), lengths)
    return jnp.asarray(ids)[None]

"""TPU attention: jax's Pallas splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`) behind our
AttentionMask. What is ours: mapping the mask onto splash's static block mask + segment ids, padding T and S to
block multiples, GQA, the scale, rows that see no key, kernel caching. Forward and backward are splash's own
kernels (its custom VJP). On CPU it runs in interpret mode.

Mapping: causal -> CausalMask(offset); causal sliding window W -> LocalMask((W - 1, 0), offset) (splash skips
blocks outside both at trace time); segment ids, kv_lengths and the padding of S -> SegmentIds (kv positions
past a row's live length get an id no query has). The q offset must be static (a Python int): per-row offsets
(decode) go to `ref.attention_live` in api.py.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa

from omni_jax.kernels.attention.mask import AttentionMask

MAX_BLOCK = 512  # MaxText's default splash block; tuned recipes use 1024-2048
LANES = 128
_PAD_KV = jnp.iinfo(jnp.int32).min  # id of keys no query may see (padding, dead cache slots)
_PAD_Q = _PAD_KV + 1  # id of padded query rows (sliced off)


def _block(n: int) -> int:
    return min(MAX_BLOCK, -(-n // LANES) * LANES)


@functools.lru_cache(maxsize=64)
def _kernel(causal: bool, window: int | None, offset: int, heads: int, t_pad: int, s_pad: int, bq: int, bkv: int,
            interpret: bool, eager: bool = True):
    shape = (t_pad, s_pad)
    if window is not None:
        one = sa.LocalMask(shape, window_size=(window - 1, 0), offset=offset)
    elif causal:
        one = sa.CausalMask(shape, offset=offset)
    else:
        one = sa.FullMask(shape)
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
    # The block tables are constants, reusable across traces (eager). Compiling for devices this host cannot run
    # (a TPU topology from a CPU host) they cannot be computed eagerly: then they are built in the trace.
    with jax.ensure_compile_time_eval() if eager else contextlib.nullcontext():
        return sa.make_splash_mha(sa.MultiHeadMask([one] * heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def splash_attention(q, k, v, mask: AttentionMask, scale: float, *, interpret: bool = False):
    """q [B, T, H, D], k/v [B, S, KV, D] -> [B, T, H, Dv]; mask with a static q_offset."""
    if not mask.static_offset:
        raise ValueError("splash_attention needs a static q_offset; per-row offsets take ref.attention_live")
    b, t, h, _ = q.shape
    s = k.shape[1]
    bq, bkv = _block(t), _block(s)
    t_pad, s_pad = -(-t // bq) * bq, -(-s // bkv) * bkv
    args = (mask.causal, mask.window, int(mask.q_offset), h, t_pad, s_pad, bq, bkv, bool(interpret))
    target = jax.sharding.get_abstract_mesh()
    dev = None if target.empty else getattr(target, "abstract_device", None)
    ahead_of_time = dev is not None and dev.platform != jax.default_backend()
    kernel = _kernel.__wrapped__(*args, eager=False) if ahead_of_time else _kernel(*args)

    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)
    qh = jnp.pad(qs.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, t_pad - t), (0, 0)))
    kh = jnp.pad(k.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, s_pad - s), (0, 0)))
    vh = jnp.pad(v.transpose(0, 2, 1, 3), ((0, 0), (0, 0), (0, s_pad - s), (0, 0)))

    _, kv_len = mask.per_row(b)
    if mask.has_segments or kv_len is not None or s_pad > s:
        live = jnp.full((b,), s, jnp.int32) if kv_len is None else jnp.minimum(kv_len, s)
        if mask.has_segments:
            q_seg = jnp.broadcast_to(mask.q_segment_ids, (b, t)).astype(jnp.int32)
            kv_seg = jnp.broadcast_to(mask.kv_segment_ids, (b, s)).astype(jnp.int32)
        else:
            q_seg, kv_seg = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
        q_seg = jnp.pad(q_seg, ((0, 0), (0, t_pad - t)), constant_values=_PAD_Q)
        kv_seg = jnp.pad(kv_seg, ((0, 0), (0, s_pad - s)), constant_values=_PAD_KV)
        kv_seg = jnp.where(jnp.arange(s_pad)[None, :] < live[:, None], kv_seg, _PAD_KV)
        out = jax.vmap(lambda q_, k_, v_, qs_, ks_: kernel(q_, k_, v_, segment_ids=sa.SegmentIds(qs_, ks_)))(
            qh, kh, vh, q_seg, kv_seg)
    else:
        out = jax.vmap(lambda q_, k_, v_: kernel(q_, k_, v_))(qh, kh, vh)
    out = out[:, :, :t].transpose(0, 2, 1, 3)
    # A query that sees no key: splash returns the mean of the masked values (or NaN when every block of its row
    # is skipped); the reference returns zeros.
    alive = mask.rows_with_keys(b, t, s)
    return jnp.where(alive[:, :, None, None], out, 0).astype(q.dtype)

"""kernels.attention: the mask rule, dispatch, and every implementation in interpret mode against the XLA reference
(fp32, forward and gradients), on odd shapes: T = S = 20 (not a block multiple), head_dim 72, GQA groups of 3.

Default cases combine the mask features in one call per implementation (interpret mode compiles slowly); the
per-kind matrix (causal, segment ids, block-diagonal, windows, sliding window, live lengths) is marked slow.
"""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.kernels.attention import AttentionImplError, AttentionMask, AttentionMaskError, attention, block_diagonal
from omni_jax.kernels.attention.api import choose_impl
from omni_jax.kernels.attention.decode_gpu import decode_attention
from omni_jax.kernels.attention.ref import attention_live, attention_ref
from omni_jax.kernels.platform import target_platform

B, T, H, KV, D = 2, 20, 6, 2, 72
SCALE = 72 ** -0.5
TOL = 1e-5


def _qkv(seed=0, t=T, s=T, d=D, b=B):
    ks = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(ks[0], (b, t, H, d)), jax.random.normal(ks[1], (b, s, KV, d)),
            jax.random.normal(ks[2], (b, s, KV, d)))


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def _check(impl, mask, seed=0, grads=True):
    """impl vs xla: forward, and gradients of a non-linear loss w.r.t. q, k, v."""
    q, k, v = _qkv(seed)
    w = jax.random.normal(jax.random.key(seed + 1), (B, T, H, D))

    def loss(which):
        return lambda q, k, v: jnp.sum(jnp.sin(attention(q, k, v, mask, scale=SCALE, impl=which)) * w)

    ref_out = attention(q, k, v, mask, scale=SCALE, impl="xla")
    out = jax.jit(lambda q, k, v: attention(q, k, v, mask, scale=SCALE, impl=impl))(q, k, v)
    assert float(jnp.max(jnp.abs(ref_out))) > 0.1  # the case attends to something
    assert _rel(out, ref_out) <= TOL, (impl, _rel(out, ref_out))
    if grads:
        g_ref = jax.grad(loss("xla"), argnums=(0, 1, 2))(q, k, v)
        g = jax.jit(jax.grad(loss(impl), argnums=(0, 1, 2)))(q, k, v)
        for name, a, r in zip("qkv", g, g_ref):
            assert _rel(a, r) <= TOL, (impl, name, _rel(a, r))


# Segment ids with every awkward case: a segment of one token (with causal: a row that sees exactly one key),
# ids absent from the other side (empty segments: rows that see nothing -> zeros), uneven segment lengths.
_SEG = np.array([[0] * 5 + [1] + [2] * 9 + [3] * 5,
                 [4] * 1 + [0] * 12 + [7] * 7], np.int32)
_QSEG = _SEG.copy()
_QSEG[1, 14:16] = 9  # no key has id 9


def _combined(q_offset=0):
    return AttentionMask(causal=True, window=6, q_offset=q_offset, q_segment_ids=jnp.asarray(_QSEG),
                         kv_segment_ids=jnp.asarray(_SEG), kv_lengths=jnp.array([T, 13]))


# -- the mask rule ---------------------------------------------------------------------------------------------


def test_dense_mask_matches_the_rule_written_out():
    off = np.array([0, 3])
    kv_len = np.array([20, 9])
    m = AttentionMask(causal=True, window=4, q_offset=jnp.asarray(off), q_segment_ids=jnp.asarray(_QSEG[:, :5]),
                      kv_segment_ids=jnp.asarray(_SEG), kv_lengths=jnp.asarray(kv_len))
    got = np.asarray(m.dense(2, 5, 20))
    want = np.zeros((2, 5, 20), bool)
    for b in range(2):
        for i in range(5):
            for j in range(20):
                p = i + off[b]
                want[b, i, j] = j < kv_len[b] and j <= p and j > p - 4 and _QSEG[b, i] == _SEG[b, j]
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.asarray(m.rows_with_keys(2, 5, 20)), want.any(-1))
    m2 = AttentionMask(causal=True, window=3, q_offset=jnp.asarray(off), kv_lengths=jnp.asarray(kv_len))
    np.testing.assert_array_equal(np.asarray(m2.rows_with_keys(2, 5, 20)), np.asarray(m2.dense(2, 5, 20)).any(-1))
    np.testing.assert_array_equal(np.asarray(block_diagonal([2, 3], 6)), [[0, 0, 1, 1, 1, -1]])


def test_mask_is_a_pytree_with_static_flags():
    m = AttentionMask(causal=True, window=3, q_offset=2, kv_lengths=jnp.array([4, 5]))
    leaves, tree = jax.tree.flatten(m)
    assert len(leaves) == 1  # only kv_lengths: causal, window and the Python-int offset are static
    m2 = jax.tree.unflatten(tree, leaves)
    assert (m2.causal, m2.window, m2.q_offset) == (True, 3, 2)
    out = jax.jit(lambda m: m.dense(2, 3, 6))(m)
    np.testing.assert_array_equal(out, m.dense(2, 3, 6))


def test_bad_masks_and_impls_are_clear_errors():
    with pytest.raises(AttentionMaskError, match="causal=True"):
        AttentionMask(window=3)
    with pytest.raises(AttentionMaskError, match="both"):
        AttentionMask(q_segment_ids=jnp.zeros((1, 3), jnp.int32))
    q, k, v = _qkv(t=4, s=4)
    with pytest.raises(AttentionMaskError, match="kv_lengths"):
        attention(q, k, v, AttentionMask(kv_lengths=jnp.zeros((3,), jnp.int32)), scale=1.0)
    with pytest.raises(AttentionImplError, match="available: auto, xla, live, splash, flash, cudnn, decode"):
        attention(q, k, v, AttentionMask(), scale=1.0, impl="triton")
    with pytest.raises(AttentionImplError, match="needs an AttentionMask"):
        attention(q, k, v, jnp.ones((1, 4, 4), bool), scale=1.0, impl="splash")
    with pytest.raises(AttentionImplError, match="segment ids"):
        attention(q, k, v, AttentionMask.segments(jnp.zeros((2, 4), jnp.int32)), scale=1.0, impl="cudnn")


def test_auto_follows_the_target_platform():
    causal, dec = AttentionMask(causal=True), AttentionMask.decode(jnp.array([5, 7]))
    assert choose_impl("auto", 512, 512, causal, "cpu") == "xla"
    assert choose_impl("auto", 512, 512, causal, "tpu") == "splash"
    assert choose_impl("auto", 1, 4096, dec, "tpu") == "live"
    assert choose_impl("auto", 512, 512, causal, "gpu") == "flash"
    assert choose_impl("auto", 1, 4096, dec, "gpu") == "decode"
    assert choose_impl("auto", 2, 16, causal, "tpu") == "xla"  # code predictor: a 16-key cache stays on XLA
    assert choose_impl("auto", 512, 512, jnp.ones((1, 512, 512), bool), "tpu") == "xla"
    q, k, v = _qkv(t=2, s=200)
    m = AttentionMask.decode(jnp.array([3, 150]), 2)
    assert choose_impl("auto", 2, 200, m, "tpu") == "live"
    with target_platform("tpu"):  # decode on a TPU target: the live-range XLA path (no kernel), same numbers
        np.testing.assert_allclose(attention(q, k, v, m, scale=SCALE), attention_ref(q, k, v, m, SCALE), rtol=1e-5,
                                   atol=1e-6)


# -- implementations vs the reference (interpret mode) ----------------------------------------------------------


def test_splash_combined_mask_forward_and_grads():
    _check("splash", _combined())


def test_flash_combined_mask_with_row_offsets_forward_and_grads():
    _check("flash", _combined(q_offset=jnp.array([0, 3])))


def test_decode_kernel_reads_live_lengths_in_place():
    """Split-K decode over a [B, S, KV, D] cache of odd length (93: the last block is read shifted back), two new
    tokens per row at different offsets, sliding window and segment ids; head_dim 64 (read in place)."""
    s, t = 93, 2
    ks = jax.random.split(jax.random.key(3), 4)
    q = jax.random.normal(ks[0], (3, t, H, 64))
    k, v = (jax.random.normal(x, (3, s, KV, 64)) for x in ks[1:3])
    seg = jax.random.randint(ks[3], (3, s), 0, 2)
    start = jnp.array([0, 40, s - t])
    m = AttentionMask(causal=True, window=30, q_offset=start, kv_lengths=start + t,
                      q_segment_ids=jnp.take_along_axis(seg, start[:, None] + jnp.arange(t)[None], axis=1),
                      kv_segment_ids=seg)
    want = attention_ref(q, k, v, m, 0.125)
    assert _rel(decode_attention(q, k, v, m, 0.125, interpret=True), want) <= TOL
    assert _rel(attention_live(q, k, v, m, 0.125, chunk=16), want) <= TOL
    # Dead cache slots never matter: garbage past each row's live end changes nothing.
    junk = jnp.where(jnp.arange(s)[None, :, None, None] >= (start + t)[:, None, None, None], 1e4, k)
    np.testing.assert_allclose(decode_attention(q, junk, v, m, 0.125, interpret=True), want, rtol=1e-5, atol=1e-5)


def test_kernels_lower_for_gpu_and_tpu():
    """Without the devices: flash (forward + backward) and decode lower to Triton kernel calls for CUDA, splash to
    Mosaic kernel calls for TPU (the lowering of our kernels runs here; compiling needs the device)."""
    q = jax.ShapeDtypeStruct((B, 200, H, D), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((B, 200, KV, D), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((B, 200), jnp.int32)

    def train(impl):
        def f(q, k, v, seg):
            m = AttentionMask.segments(seg, causal=True)
            return jax.grad(lambda q, k, v: attention(q, k, v, m, scale=0.1, impl=impl).astype(jnp.float32).sum(),
                            argnums=(0, 1, 2))(q, k, v)
        return f

    def lowered(f, platform, *args):
        return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()

    with target_platform("gpu"):
        assert lowered(train("flash"), "cuda", q, k, k, seg).count("xla.gpu.triton") == 3
        cache = jax.ShapeDtypeStruct((B, 1024, KV, 128), jnp.bfloat16)
        step = jax.ShapeDtypeStruct((B, 1, H, 128), jnp.bfloat16)
        dec = lambda q, k, v, st: attention(q, k, v, AttentionMask.decode(st), scale=0.1)  # noqa: E731
        st = jax.ShapeDtypeStruct((B,), jnp.int32)
        assert lowered(dec, "cuda", step, cache, cache, st).count("xla.gpu.triton") == 1
    with target_platform("tpu"):
        assert lowered(train("splash"), "tpu", q, k, k, seg).count("tpu_custom_call") == 3


def test_model_call_sites_on_splash_match_xla():
    """The tiny Code2Wav pre-transformer (causal sliding window) and audio encoder windows (kv lengths) give the
    same activations with attention_impl="splash" (interpret mode) as with the XLA reference."""
    from flax import nnx

    from omni_jax import config as C
    from omni_jax.models.code2wav import PreTransformer

    cfg = dataclasses.replace(C.tiny().code2wav_config, sliding_window=5)
    pre = PreTransformer(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 2 * cfg.sliding_window + 3, cfg.hidden_size))
    assert _rel(pre(x, "splash"), pre(x, "xla")) <= TOL


# -- the full matrix: one mask kind per case -----------------------------------------------------------------


_KINDS = {
    "causal": lambda: AttentionMask(causal=True),
    "segments": lambda: AttentionMask(q_segment_ids=jnp.asarray(_QSEG), kv_segment_ids=jnp.asarray(_SEG)),
    "segments_causal": lambda: AttentionMask.segments(jnp.asarray(_SEG), causal=True),
    "block_diagonal": lambda: AttentionMask.segments(jnp.broadcast_to(block_diagonal([7, 1, 9], T), (B, T))),
    "windows": lambda: AttentionMask(kv_lengths=jnp.array([T, 0])),  # audio windows: live prefix (0 = all padding)
    "sliding_window": lambda: AttentionMask(causal=True, window=3),
    "live_lengths_offset": lambda: AttentionMask(causal=True, q_offset=-2, kv_lengths=jnp.array([11, 17])),
}


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["splash", "flash"])
@pytest.mark.parametrize("kind", sorted(_KINDS))
def test_each_mask_kind(impl, kind):
    _check(impl, _KINDS[kind]())


@pytest.mark.slow
def test_live_path_matches_reference_for_each_kind():
    q, k, v = _qkv()
    for kind, make in _KINDS.items():
        m = make()
        assert _rel(attention_live(q, k, v, m, SCALE, chunk=8), attention_ref(q, k, v, m, SCALE)) <= TOL, kind


os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # lowering for TPU may open libtpu beside other processes

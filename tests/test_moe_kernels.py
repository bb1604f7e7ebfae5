"""The expert-FFN implementations agree with each other and with a per-token loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omni_jax.kernels.moe import api
from omni_jax.layers.mlp import MoE


def _inputs(n=13, h=24, i=10, e=6, k=3, seed=0):
    r = np.random.RandomState(seed)
    x = r.randn(n, h).astype(np.float32)
    idx = np.stack([r.choice(e, k, replace=False) for _ in range(n)]).astype(np.int32)
    w = r.rand(n, k).astype(np.float32)
    wg, wu = r.randn(e, i, h).astype(np.float32) * 0.3, r.randn(e, i, h).astype(np.float32) * 0.3  # [out, in]
    wd = r.randn(e, h, i).astype(np.float32) * 0.3
    return x, idx, w, wg, wu, wd


def _loop(x, idx, w, wg, wu, wd):
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            g, u = wg[e] @ x[t], wu[e] @ x[t]
            out[t] += w[t, j] * (wd[e] @ (g / (1 + np.exp(-g)) * u))
    return out


@pytest.mark.parametrize("impl", ["sorted", "tiled", "bucketed", "slices", "gather", "dense", "auto"])
def test_impls_match_loop(impl):
    args = _inputs()
    want = _loop(*args)
    got = jax.jit(lambda *a: api.expert_ffn(*a, impl=impl))(*map(jnp.asarray, args))
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["sorted", "tiled", "bucketed"])
def test_unused_experts_and_skewed_routing(impl):
    x, idx, w, wg, wu, wd = _inputs(n=40, e=8, k=2, seed=1)
    idx[:] = np.array([5, 2])  # every token on the same two experts; others empty groups
    want = _loop(x, idx, w, wg, wu, wd)
    got = api.expert_ffn(*map(jnp.asarray, (x, idx, w, wg, wu, wd)), impl=impl)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_tiled_with_tiles_smaller_than_groups():
    from omni_jax.kernels.moe.ref import expert_ffn_tiled

    args = _inputs(n=50, e=4, k=2, seed=2)
    got = expert_ffn_tiled(*map(jnp.asarray, args), tile=8)
    np.testing.assert_allclose(np.asarray(got), _loop(*args), rtol=1e-5, atol=1e-5)


def test_bucketed_every_capacity_level_and_the_fallback():
    """Routings whose largest group lands in each capacity level, and one beyond all levels (tiled fallback):
    every branch of the run-time switch computes the same function."""
    from omni_jax.kernels.moe.ref import capacity_levels, expert_ffn_bucketed

    n, e, k = 48, 8, 2
    levels = capacity_levels(n * k, e)
    assert levels[0] >= -(-(n * k) // e) and levels[-1] < n * k
    x, idx, w, wg, wu, wd = _inputs(n=n, e=e, k=k, seed=3)
    for largest in [*levels, levels[-1] + 1]:  # a group exactly at each level, then one beyond them all
        idx2 = np.stack([(1 + t % (e - 1), 1 + (t + 1) % (e - 1)) for t in range(n)]).astype(np.int32)
        idx2[:largest, 0] = 0  # expert 0 holds `largest` copies; the rest spread over experts 1..e-1
        assert np.bincount(idx2.ravel(), minlength=e).max() == largest
        want = _loop(x, idx2, w, wg, wu, wd)
        got = jax.jit(expert_ffn_bucketed)(*map(jnp.asarray, (x, idx2, w, wg, wu, wd)))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5, err_msg=f"largest group {largest}")


def test_auto_picks_selected_experts_for_decode_and_grouped_for_prefill():
    assert api.choose_impl(num_tokens=1, top_k=8, num_experts=128, backend="cpu") == "gather"
    assert api.choose_impl(num_tokens=16, top_k=8, num_experts=128, backend="cpu") == "gather"
    assert api.choose_impl(num_tokens=17, top_k=8, num_experts=128, backend="cpu") == "bucketed"
    assert api.choose_impl(num_tokens=1, top_k=8, num_experts=128, backend="gpu") == "fused_decode"
    assert api.choose_impl(num_tokens=512, top_k=8, num_experts=128, backend="cuda") == "triton_gmm"
    assert api.choose_impl(num_tokens=1, top_k=8, num_experts=128, backend="tpu") == "megablox"
    assert api.choose_impl(num_tokens=512, top_k=8, num_experts=128, backend="tpu") == "megablox"
    assert api.choose_impl(num_tokens=512, top_k=8, num_experts=128, backend="cpu") == "bucketed"
    with pytest.raises(ValueError, match="unknown expert_ffn impl 'nope'; available: auto, bucketed"):
        api.expert_ffn(*map(jnp.asarray, _inputs()), impl="nope")


@pytest.mark.parametrize("norm", [True, False])
def test_moe_block_router(norm):
    """Router: fp32 softmax over all experts, top-k, optional renormalisation; shared expert gate."""
    m = MoE(16, 8, num_experts=5, top_k=2, norm_topk_prob=norm, shared_inner=6, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 3, 16))
    y, probs, top_i = m(x)
    xf = np.asarray(x).reshape(-1, 16)
    logits = xf @ np.asarray(m.gate.kernel[...])
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(np.asarray(probs), p, rtol=1e-5)
    order = np.argsort(-p, axis=-1)[:, :2]
    np.testing.assert_array_equal(np.sort(np.asarray(top_i), -1), np.sort(order, -1))
    w = np.take_along_axis(p, order, -1)
    if norm:
        w = w / w.sum(-1, keepdims=True)
    ex = m.experts
    want = _loop(xf, order.astype(np.int32), w, np.asarray(ex.gate_proj[...]), np.asarray(ex.up_proj[...]),
                 np.asarray(ex.down_proj[...]))
    gate = 1 / (1 + np.exp(-(xf @ np.asarray(m.shared_expert_gate.kernel[...]))))
    want = want + gate * np.asarray(m.shared_expert(jnp.asarray(xf)))
    np.testing.assert_allclose(np.asarray(y).reshape(-1, 16), want, rtol=1e-4, atol=1e-5)

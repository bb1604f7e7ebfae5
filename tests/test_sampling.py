"""Sampling semantics (HF warper order) and parameter validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_jax.sampling import SamplingError, SamplingParams, filter_logits, next_token


def test_top_k_keeps_ties_and_top_p_keeps_at_least_one():
    logits = jnp.array([[1.0, 3.0, 3.0, 0.5, 2.0]])
    out = np.asarray(filter_logits(logits, top_k=2))
    assert np.isfinite(out).sum() == 2 and np.isfinite(out[0, 1]) and np.isfinite(out[0, 2])
    out = np.asarray(filter_logits(jnp.array([[10.0, 0.0, 0.0]]), top_p=0.01))
    assert np.isfinite(out).sum() == 1 and np.isfinite(out[0, 0])


def test_top_p_mass():
    p = np.array([0.5, 0.3, 0.15, 0.05])
    out = np.asarray(filter_logits(jnp.log(jnp.asarray(p))[None], top_p=0.75))
    assert np.isfinite(out[0]).tolist() == [True, True, False, False]


def test_greedy_repetition_penalty_and_suppress():
    logits = jnp.array([[2.0, 1.9, -1.0]])
    seen = jnp.array([[True, False, False]])
    assert int(next_token(logits, None, SamplingParams(), seen=None)[0]) == 0
    assert int(next_token(logits, None, SamplingParams(repetition_penalty=1.2), seen=seen)[0]) == 1
    assert int(next_token(logits, None, SamplingParams(), suppress=jnp.array([True, True, False]))[0]) == 2


def test_sampling_is_seeded():
    logits = jnp.zeros((4, 50))
    p = SamplingParams(greedy=False, temperature=0.7, top_k=10, top_p=0.9)
    a = next_token(logits, jax.random.PRNGKey(0), p)
    b = next_token(logits, jax.random.PRNGKey(0), p)
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kw, msg", [
    (dict(greedy=False, temperature=0.0), "temperature"),
    (dict(greedy=False, temperature=-1.0), "temperature"),
    (dict(top_k=-3), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
])
def test_invalid_values(kw, msg):
    with pytest.raises(SamplingError, match=msg):
        SamplingParams(**kw)

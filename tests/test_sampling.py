"""Sampling semantics (HF warper order) and parameter validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sampling_stats import ALPHA, chi2_pvalue, expected_probs

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


# Distribution tests: many seeded draws (one categorical call over N identical rows draws N independent samples)
# must follow softmax(filtered logits / T), with the expected probabilities computed in numpy, independently of
# omni_jax.sampling (tests/sampling_stats.py). Chi-square goodness of fit at significance ALPHA with a fixed seed
# (so deterministic); each test also checks that the same counts reject the distribution one would get with a
# step changed or left out, so the test is shown to be able to fail.

def _draw_counts(logits, params, seen=None, suppress=None, n=40_000, seed=0):
    v = logits.shape[-1]
    rows = jnp.broadcast_to(jnp.asarray(logits, jnp.float32), (n, v))
    seen_rows = None if seen is None else jnp.broadcast_to(jnp.asarray(seen), (n, v))
    sup = None if suppress is None else jnp.asarray(suppress)
    ids = jax.jit(lambda r, k, s: next_token(r, k, params, seen=s, suppress=sup))(rows, jax.random.PRNGKey(seed),
                                                                                   seen_rows)
    return np.bincount(np.asarray(ids), minlength=v)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 8, 0.9), (1.3, None, 0.8), (1.0, 5, None)])
def test_thinker_sampler_matches_softmax_distribution(temperature, top_k, top_p):
    """The thinker's sampler (next_token with SamplingParams): frequencies match the filtered softmax."""
    logits = np.random.RandomState(1).randn(16) * 1.5
    params = SamplingParams(greedy=False, temperature=temperature, top_k=top_k, top_p=top_p)
    counts = _draw_counts(logits, params)
    probs = expected_probs(logits, temperature, top_k, top_p)
    assert counts[probs == 0].sum() == 0, "a filtered-out token was sampled"
    assert (counts[probs > 0.01] > 0).all()
    assert chi2_pvalue(counts, probs) > ALPHA
    # Power: the same support at a 15% higher temperature is rejected by the same counts.
    wrong = np.where(probs > 0, expected_probs(logits, temperature * 1.15), 0.0)
    assert chi2_pvalue(counts, wrong / wrong.sum()) < 1e-6


def test_talker_sampler_matches_distribution_with_repetition_penalty():
    """The talker's sampler (talker_sampling(): T=0.9, top_k=50, repetition penalty 1.05 over the codec ids seen,
    suppressed ids): frequencies match the numpy reference of the whole processor chain."""
    from omni_jax.speech import talker_sampling

    v = 96
    rs = np.random.RandomState(2)
    logits = rs.randn(v) * 1.2
    logits[:6] = [3.0, 2.8, -0.5, 2.9, -0.2, 2.7]  # seen ids with positive and negative logits
    seen = np.zeros(v, bool)
    seen[:5] = True
    suppress = np.zeros(v, bool)
    suppress[80:] = True
    suppress[6] = True
    logits[6] = 5.0  # the largest logit, suppressed
    params = talker_sampling()
    assert (params.temperature, params.top_k, params.repetition_penalty) == (0.9, 50, 1.05)
    counts = _draw_counts(logits, params, seen=seen, suppress=suppress)
    probs = expected_probs(logits, 0.9, 50, 1.0, seen=seen, penalty=1.05, suppress=suppress)
    assert counts[suppress].sum() == 0 and counts[probs == 0].sum() == 0
    assert chi2_pvalue(counts, probs) > ALPHA
    no_penalty = expected_probs(logits, 0.9, 50, 1.0, suppress=suppress)
    assert chi2_pvalue(counts, no_penalty) < 1e-6  # the 1.05 penalty is visible in these counts


def test_sampling_depends_on_the_seed():
    logits = jnp.asarray(np.random.RandomState(3).randn(4, 50))
    p = SamplingParams(greedy=False, temperature=0.7, top_k=10, top_p=0.9)
    draws = [np.asarray(next_token(logits, jax.random.PRNGKey(s), p)) for s in (0, 0, 1, 2)]
    np.testing.assert_array_equal(draws[0], draws[1])
    assert not (np.array_equal(draws[0], draws[2]) and np.array_equal(draws[0], draws[3]))


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

"""Reference sampling distributions for the distribution tests (test_sampling.py, test_talker_modules.py):
HF's logits-processor chain in numpy, written apart from omni_jax.sampling, and a chi-square goodness of fit."""

import numpy as np
from scipy import stats

ALPHA = 1e-3  # significance of the goodness-of-fit tests (fixed seeds: each test is deterministic)


def expected_probs(logits, temperature=1.0, top_k=None, top_p=None, seen=None, penalty=1.0, suppress=None):
    """logits float[V] -> probabilities float64[V] after HF's chain: repetition penalty (ids in bool `seen`) ->
    suppressed ids -> temperature -> top-k (ties with the k-th kept) -> top-p (ascending cumsum <= 1 - top_p
    dropped, the largest always kept)."""
    x = np.asarray(logits, np.float64).copy()
    if seen is not None and penalty != 1.0:
        x[seen] = np.where(x[seen] < 0, x[seen] * penalty, x[seen] / penalty)
    if suppress is not None:
        x[suppress] = -np.inf
    x = x / temperature
    if top_k:
        x[x < np.sort(x)[::-1][top_k - 1]] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p is not None and top_p < 1.0:
        order = np.argsort(x, kind="stable")  # ascending
        drop = np.cumsum(p[order]) <= 1.0 - top_p
        drop[-1] = False
        p[order[drop]] = 0.0
        p /= p.sum()
    return p


def chi2_pvalue(counts, probs) -> float:
    """Pearson chi-square p-value of int `counts` [V] against `probs` [V] over the support of `probs` (bins with
    an expected count below 5 pooled into one)."""
    counts = np.asarray(counts)
    exp = probs * counts.sum()
    support = probs > 0
    big = exp >= 5
    obs_b, exp_b = list(counts[big]), list(exp[big])
    small = support & ~big
    if small.any():
        obs_b.append(counts[small].sum())
        exp_b.append(exp[small].sum())
    exp_b = np.array(exp_b) * (np.sum(obs_b) / np.sum(exp_b))  # equal totals (draws off the support: test apart)
    return float(stats.chisquare(np.array(obs_b), exp_b).pvalue)

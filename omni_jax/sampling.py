"""Token sampling with Hugging Face's logits-warper semantics (temperature -> top-k -> top-p), pure JAX.

`filter_logits` reproduces the warper chain that `transformers` applies when `do_sample=True`:

- temperature: `logits / temperature` (skipped when temperature == 1, as HF does);
- top-k (`TopKLogitsWarper`): drop every logit strictly below the k-th largest, so ties with the k-th value
  are kept (more than k survivors is possible);
- top-p (`TopPLogitsWarper`): sort ascending, softmax, cumulative sum; drop the sorted entries whose cumulative
  probability is <= 1 - top_p, always keeping the largest one (min_tokens_to_keep=1).

Dropped entries become -inf. `sample_logits` then draws from softmax of the filtered logits
(`torch.multinomial` in HF; `jax.random.categorical` here, so draws match in distribution, not bit for bit).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from omni_jax.errors import OmniJaxError


class SamplingError(OmniJaxError):
    """Invalid sampling parameters."""


def filter_logits(logits: jnp.ndarray, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> jnp.ndarray:
    """logits: float[..., V] -> fp32 [..., V] with filtered entries set to -inf (HF warper order)."""
    x = logits.astype(jnp.float32)  # HF warpers see the fp32 logits generate() keeps
    if temperature is not None and temperature != 1.0:
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
        x = x / temperature
    vocab = x.shape[-1]
    if top_k is not None and top_k != 0:
        if top_k < 0:
            raise ValueError(f"top_k must be a positive integer, got {top_k}")
        kth = jax.lax.top_k(x, min(int(top_k), vocab))[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if top_p is not None and top_p < 1.0:
        if top_p < 0:
            raise ValueError(f"top_p must be in [0, 1], got {top_p}")
        order = jnp.argsort(x, axis=-1)  # ascending, stable
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_x, axis=-1), axis=-1)
        remove_sorted = cum <= 1.0 - top_p
        remove_sorted = remove_sorted.at[..., -1].set(False)  # min_tokens_to_keep = 1
        remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1)
        x = jnp.where(remove, -jnp.inf, x)
    return x


def sample_logits(logits: jnp.ndarray, rng: jax.Array, temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> jnp.ndarray:
    """Draw token ids int32[...] from logits float[..., V] after `filter_logits`."""
    x = filter_logits(logits, temperature, top_k, top_p)
    return jax.random.categorical(rng, x, axis=-1).astype(jnp.int32)


def greedy(logits: jnp.ndarray) -> jnp.ndarray:
    """argmax over the last axis (first index on ties, as torch.argmax)."""
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Hashable (usable as a static jit argument). greedy=True ignores temperature/top_k/top_p."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not self.greedy and not self.temperature > 0:
            raise SamplingError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if self.top_k is not None and self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise SamplingError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(logits: jnp.ndarray, seen: jnp.ndarray, penalty: float) -> jnp.ndarray:
    """HF RepetitionPenaltyLogitsProcessor: for ids already seen, logit<0 -> logit*penalty else logit/penalty.

    logits float[B, V]; seen bool[B, V].
    """
    x = logits.astype(jnp.float32)
    penalised = jnp.where(x < 0, x * penalty, x / penalty)
    return jnp.where(seen, penalised, x)


def next_token(logits: jnp.ndarray, rng: jax.Array, params: SamplingParams, seen: jnp.ndarray | None = None,
               suppress: jnp.ndarray | None = None):
    """logits float[B, V] -> ids int32[B]: repetition penalty (if any), suppressed ids (bool [V]) set to -inf,
    then greedy argmax or HF-style sampling."""
    x = logits.astype(jnp.float32)
    if seen is not None and params.repetition_penalty != 1.0:
        x = apply_repetition_penalty(x, seen, params.repetition_penalty)
    if suppress is not None:
        x = jnp.where(suppress, -jnp.inf, x)
    if params.greedy:
        return greedy(x)
    return sample_logits(x, rng, params.temperature, params.top_k, params.top_p)

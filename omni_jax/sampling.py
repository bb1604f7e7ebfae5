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


@dataclasses.dataclass
class RowSampling:
    """Per-row sampling parameters as arrays, so one compiled step serves any mix of requests.

    greedy bool [B]; temperature, top_p, repetition_penalty float32 [B]; top_k int32 [B] (0: off)."""

    greedy: jnp.ndarray
    temperature: jnp.ndarray
    top_k: jnp.ndarray
    top_p: jnp.ndarray
    repetition_penalty: jnp.ndarray


jax.tree_util.register_dataclass(RowSampling, data_fields=["greedy", "temperature", "top_k", "top_p",
                                                           "repetition_penalty"], meta_fields=[])


def row_values(p: SamplingParams) -> dict:
    """One row of RowSampling (host scalars) from SamplingParams."""
    return dict(greedy=bool(p.greedy), temperature=float(p.temperature), top_k=int(p.top_k or 0),
                top_p=float(1.0 if p.top_p is None else p.top_p), repetition_penalty=float(p.repetition_penalty))


def next_token_rows(logits: jnp.ndarray, keys: jnp.ndarray, p: RowSampling, seen: jnp.ndarray | None = None,
                    suppress: jnp.ndarray | None = None) -> jnp.ndarray:
    """`next_token` with per-row parameters: logits float [B, V], keys [B] PRNG keys (one stream per row) -> int32
    [B]. Same warper chain as `filter_logits` (temperature, top-k keeping ties, top-p keeping the largest) per row."""
    x = logits.astype(jnp.float32)
    if seen is not None:
        pen = p.repetition_penalty[:, None]
        x = jnp.where(seen & (pen != 1.0), jnp.where(x < 0, x * pen, x / pen), x)
    if suppress is not None:
        x = jnp.where(suppress, -jnp.inf, x)
    argmax = greedy(x)
    vocab = x.shape[-1]
    y = x / jnp.where(p.greedy, 1.0, p.temperature)[:, None]
    k = jnp.where(p.top_k > 0, jnp.minimum(p.top_k, vocab), vocab)
    kth = jnp.take_along_axis(-jnp.sort(-y, axis=-1), (k - 1)[:, None], axis=-1)
    y = jnp.where(y < kth, -jnp.inf, y)
    order = jnp.argsort(y, axis=-1)  # ascending, stable (as filter_logits)
    cum = jnp.cumsum(jax.nn.softmax(jnp.take_along_axis(y, order, axis=-1), axis=-1), axis=-1)
    remove_sorted = (cum <= 1.0 - p.top_p[:, None]).at[..., -1].set(False)
    remove = jnp.take_along_axis(remove_sorted, jnp.argsort(order, axis=-1), axis=-1) & (p.top_p < 1.0)[:, None]
    y = jnp.where(remove, -jnp.inf, y)
    drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, y).astype(jnp.int32)
    return jnp.where(p.greedy, argmax, drawn)

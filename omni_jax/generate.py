"""Thinker text generation: jit-compiled prefill and single-token decode over a static-shape KV cache.

- Prompts are right-padded to a length bucket (powers of two from 16), so a new prompt length reuses a compiled
  prefill; the cache length is the bucket plus the decode budget, rounded up to a bucket too.
- Each row writes its next token at its own cache index (its prompt length + step), so rows of different lengths
  decode together; keys beyond a row's index are masked, so the padding written by prefill is never seen.
- Decode reads only the selected experts' weights (`kernels.moe` picks the gather path for few tokens).
- A token generated at unpadded text index n gets rope position n + delta on all three axes (reference §3).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni_jax.errors import OmniJaxError
from omni_jax.models.thinker import Thinker
from omni_jax.sampling import SamplingParams, next_token


class GenerationError(OmniJaxError):
    """Bad generation request (too long for the context, empty prompt, ...)."""


def bucket(n: int, minimum: int = 16) -> int:
    b = minimum
    while b < n:
        b *= 2
    return b


@dataclasses.dataclass
class PromptBatch:
    """What prefill needs, built on the host (text only, or after multimodal placeholder expansion).

    input_ids: int [B, P] right-padded; lengths: int [B]; positions: int [3, B, P] (rope positions);
    deltas: int [B] (rope delta for decoding). Multimodal inputs add `embeds_fn` which maps the token embeddings
    to the merged embeddings (scattered encoder rows) and `deepstack` (list of [B, P, H]).
    """

    input_ids: np.ndarray
    lengths: np.ndarray
    positions: np.ndarray
    deltas: np.ndarray
    embeds_fn: Callable | None = None
    deepstack: list | None = None


def text_prompt_batch(prompts: list[list[int]], pad_id: int = 0, min_bucket: int = 16) -> PromptBatch:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt must contain at least one token")
    lengths = np.array([len(p) for p in prompts], np.int32)
    p = bucket(int(lengths.max()), min_bucket)
    ids = np.full((len(prompts), p), pad_id, np.int32)
    for i, row in enumerate(prompts):
        ids[i, :len(row)] = row
    pos = np.broadcast_to(np.arange(p, dtype=np.int32)[None, None], (3, len(prompts), p)).copy()
    return PromptBatch(ids, lengths, pos, np.zeros(len(prompts), np.int32))


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[list[int]]  # generated ids per row (includes the stop id if one was produced)
    finished: list[bool]


def _causal_mask(p: int):
    return jnp.tril(jnp.ones((p, p), bool))[None]


class ThinkerGenerator:
    """Holds the compiled prefill/decode functions for one thinker; reuse it across requests."""

    def __init__(self, thinker: Thinker, *, max_context: int | None = None, cache_dtype=None):
        self.graphdef, self.state = nnx.split(thinker)
        self.cfg = thinker.cfg.text_config
        self.max_context = max_context or self.cfg.max_position_embeddings
        self.cache_dtype = cache_dtype
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("cache_len",))
        self._decode = jax.jit(self._decode_impl, static_argnames=("params",), donate_argnums=(1,))

    # -- pure functions (jitted) -------------------------------------------------------------------------
    def _empty_cache(self, b, cache_len, dtype):
        c = self.cfg
        shape = (b, cache_len, c.num_key_value_heads, c.head_dim)
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.num_hidden_layers)]

    def _prefill_impl(self, state, embeds, positions, lengths, deepstack, cache_len: int):
        model = nnx.merge(self.graphdef, state)
        b, p, _ = embeds.shape
        cache = self._empty_cache(b, cache_len, self.cache_dtype or embeds.dtype)
        hidden, cache, _ = model.model(embeds, positions, _causal_mask(p), cache=cache, deepstack=deepstack)
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return model.logits(last), cache

    def _decode_impl(self, state, cache, tokens, write_idx, rope_pos, rng, seen, params: SamplingParams):
        """tokens [B] (the last sampled ids) -> next ids [B], logits [B, V], new cache."""
        model = nnx.merge(self.graphdef, state)
        b = tokens.shape[0]
        x = model.embed(tokens[:, None])
        pos = jnp.broadcast_to(rope_pos[None, :, None], (3, b, 1))
        s = cache[0][0].shape[1]
        mask = (jnp.arange(s)[None, None, :] <= write_idx[:, None, None])
        hidden, cache, _ = model.model(x, pos, mask, cache=cache, cache_start=write_idx)
        logits = model.logits(hidden[:, 0])
        nxt = next_token(logits, rng, params, seen=seen)
        return nxt, logits, cache

    # -- host loop -----------------------------------------------------------------------------------------
    def generate(self, batch: PromptBatch, *, max_new_tokens: int, sampling: SamplingParams,
                 stop_ids: tuple[int, ...] = (), dtype=None, return_logits: bool = False,
                 on_token: Callable[[np.ndarray], None] | None = None) -> GenerationResult:
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        b, p = batch.input_ids.shape
        longest = int(batch.lengths.max())
        if longest + max_new_tokens > self.max_context:
            raise GenerationError(
                f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} = {longest + max_new_tokens} exceeds "
                f"the model's context of {self.max_context} tokens (max_position_embeddings)")
        cache_len = bucket(p + max_new_tokens)
        model_dtype = dtype or jax.tree.leaves(self.state)[0].dtype
        ids = jnp.asarray(batch.input_ids)
        embeds = nnx.merge(self.graphdef, self.state).embed(ids) if batch.embeds_fn is None else batch.embeds_fn(ids)
        embeds = embeds.astype(model_dtype)
        lengths = jnp.asarray(batch.lengths)
        logits, cache = self._prefill(self.state, embeds, jnp.asarray(batch.positions), lengths,
                                      batch.deepstack, cache_len=cache_len)
        vocab = logits.shape[-1]
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen_np = np.zeros((b, vocab), bool)
            for i in range(b):
                seen_np[i, batch.input_ids[i, :batch.lengths[i]]] = True
            seen = jnp.asarray(seen_np)
        rng = jax.random.PRNGKey(sampling.seed)
        rng, sub = jax.random.split(rng)
        tok = next_token(logits, sub, sampling, seen=seen)
        out = [[] for _ in range(b)]
        finished = np.zeros(b, bool)
        all_logits = [np.asarray(logits)] if return_logits else None
        stop = np.array(stop_ids, np.int64)
        for step in range(max_new_tokens):
            tok_np = np.asarray(tok)
            for i in range(b):
                if not finished[i]:
                    out[i].append(int(tok_np[i]))
                    if tok_np[i] in stop:
                        finished[i] = True
            if on_token is not None:
                on_token(tok_np)
            if finished.all() or step == max_new_tokens - 1:
                break
            if seen is not None:
                seen = seen.at[jnp.arange(b), tok].set(True)
            write_idx = lengths + step
            rope_pos = write_idx + jnp.asarray(batch.deltas)
            rng, sub = jax.random.split(rng)
            tok, logits, cache = self._decode(self.state, cache, tok, write_idx, rope_pos, sub, seen,
                                              params=sampling)
            if return_logits:
                all_logits.append(np.asarray(logits))
        res = GenerationResult(out, finished.tolist())
        if return_logits:
            res.logits = all_logits
        return res

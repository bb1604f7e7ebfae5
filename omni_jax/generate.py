"""Thinker text generation for a static batch of prompts, on the serving engine's compiled steps.

The prefill and decode steps live in omni_jax/serving/engine.py (`ThinkerSlots`: chunked prefill into a slot,
decode chunks in a static-trip-count loop); `ThinkerGenerator` runs one batch through them (row i in slot i) for
benchmarks and tests that hold a Thinker module rather than a model directory. Requests from users go through
omni_jax.serving.Engine (OmniSession, `omni-jax generate`, `omni-jax serve`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from omni_jax.errors import OmniJaxError
from omni_jax.sampling import SamplingParams


class GenerationError(OmniJaxError):
    """Bad generation request (too long for the context, empty prompt, ...)."""


def bucket(n: int, minimum: int = 16) -> int:
    b = minimum
    while b < n:
        b *= 2
    return b


@dataclasses.dataclass
class PromptBatch:
    """What prefill needs, built on the host.

    input_ids: int [B, P] right-padded to a bucket; lengths: int [B]; positions: [3, B, P] rope positions (int,
    or float32 when video times are fractional); deltas: [B] rope delta for decoding (reference §3).
    For multimodal prompts `embeds` [B, P, H] holds the merged input embeddings (encoder rows scattered into
    placeholders) and `deepstack` the DeepStack features.
    """

    input_ids: np.ndarray
    lengths: np.ndarray
    positions: np.ndarray
    deltas: np.ndarray
    embeds: object = None
    deepstack: list | None = None


def pad_prompts(prompts: list[list[int]], pad_id: int = 0, min_bucket: int = 16):
    """Right-pad to a length bucket: (ids int32 [B, P], lengths int32 [B])."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt must contain at least one token")
    lengths = np.array([len(p) for p in prompts], np.int32)
    p = bucket(int(lengths.max()), min_bucket)
    ids = np.full((len(prompts), p), pad_id, np.int32)
    for i, row in enumerate(prompts):
        ids[i, :len(row)] = row
    return ids, lengths


def text_prompt_batch(prompts: list[list[int]], pad_id: int = 0, min_bucket: int = 16) -> PromptBatch:
    ids, lengths = pad_prompts(prompts, pad_id, min_bucket)
    p = ids.shape[1]
    pos = np.broadcast_to(np.arange(p, dtype=np.int32)[None, None], (3, len(prompts), p)).copy()
    return PromptBatch(ids, lengths, pos, np.zeros(len(prompts), np.float32))


@dataclasses.dataclass
class GenerationResult:
    token_ids: list[list[int]]  # generated ids per row (includes the stop id if one was produced)
    finished: list[bool]
    logits: list | None = None  # return_logits: [first step's fp32 logits [B, V]]


class ThinkerGenerator:
    """A static batch through the engine's thinker steps: `generate` puts row i in slot i, prefills it (chunked),
    then runs decode chunks until every row has stopped."""

    def __init__(self, thinker, *, max_context: int | None = None, moe_impl: str = "auto", mesh=None,
                 rules="default", chunk_steps: int = 16, prefill_chunk: int = 256):
        self.thinker, self.moe_impl, self.mesh, self.rules = thinker, moe_impl, mesh, rules
        self.max_context = max_context or thinker.cfg.text_config.max_position_embeddings
        self.chunk_steps, self.prefill_chunk = chunk_steps, prefill_chunk
        self.slots = None

    def check_context(self, prompt_tokens: int, max_new_tokens: int, what: str = "prompt"):
        """Raise before any work if the request cannot fit the model's context."""
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if prompt_tokens + max_new_tokens > self.max_context:
            raise GenerationError(
                f"{what} of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} = "
                f"{prompt_tokens + max_new_tokens} exceeds the model's context of {self.max_context} tokens "
                "(max_position_embeddings)")

    def _steps(self, rows: int, context: int, stop_ids):
        from omni_jax.serving.engine import ThinkerSlots

        key = (rows, context, tuple(stop_ids))
        if self.slots is None or self.slots[0] != key:
            self.slots = (key, ThinkerSlots(self.thinker, slots=rows, context=context, stop_ids=stop_ids,
                                            chunk_steps=self.chunk_steps, prefill_chunk=self.prefill_chunk,
                                            mesh=self.mesh, rules=self.rules, moe_impl=self.moe_impl))
        return self.slots[1]

    def prefill(self, batch: PromptBatch, *, max_new_tokens: int, stop_ids: tuple[int, ...] = ()):
        """Prefill every row of `batch` into its slot (chunks of prefill_chunk): fp32 logits [B, V] of each row's
        last prompt token (a device array; benchmarks time this)."""
        import jax.numpy as jnp

        from omni_jax.serving.engine import split_chunks

        self.check_context(int(batch.lengths.max()), max_new_tokens)
        steps = self._steps(batch.input_ids.shape[0], bucket(int(batch.lengths.max()) + max_new_tokens), stop_ids)
        rows = []
        for i, n in enumerate(batch.lengths):
            for start, valid, t in split_chunks(int(n), steps.prefill_chunk):
                ids = np.zeros(t, np.int32)
                ids[:valid] = batch.input_ids[i, start:start + valid]
                pos = np.zeros((3, t), np.float32)
                pos[:, :valid] = batch.positions[:, i, start:start + valid]
                piece = None if batch.embeds is None else np.zeros((t, batch.embeds.shape[-1]), np.float32)
                if piece is not None:
                    piece[:valid] = np.asarray(batch.embeds[i, start:start + valid])
                logits, _ = steps.prefill(i, start, pos, ids=ids, embeds=piece, last=valid - 1)
            rows.append(logits)
        return jnp.stack(rows).astype(jnp.float32)

    def generate(self, batch: PromptBatch, *, max_new_tokens: int, sampling: SamplingParams,
                 stop_ids: tuple[int, ...] = (), return_logits: bool = False) -> GenerationResult:
        """Every row of `batch` with the same sampling (row i's PRNG stream: seed + i). return_logits: the result's
        `logits` holds the first step's fp32 logits [B, V] (as a one-element list)."""
        first = self.prefill(batch, max_new_tokens=max_new_tokens, stop_ids=stop_ids)
        steps = self.slots[1]
        b = batch.input_ids.shape[0]
        out = [[] for _ in range(b)]
        for i in range(b):
            n = int(batch.lengths[i])
            seen = None
            if sampling.repetition_penalty != 1.0:
                seen = np.zeros(steps.vocab, bool)
                seen[batch.input_ids[i, :n]] = True
            tok = steps.first_token(first[i], sampling, sampling.seed + i, seen)
            out[i].append(tok)
            if seen is not None:
                seen[tok] = True
            live = tok not in stop_ids and max_new_tokens > 1
            steps.insert(i, tok=tok, idx=n, delta=float(batch.deltas[i]), remaining=max_new_tokens - 1 if live else 0,
                         seed=sampling.seed + i, count=1, sampling=sampling, seen=seen)
        active = np.array([o[-1] not in stop_ids and max_new_tokens > 1 for o in out])
        while active.any():
            toks, emitted, active = steps.decode()
            for i in range(b):
                out[i].extend(toks[i][emitted[i]].tolist())
        finished = [bool(o and o[-1] in stop_ids) for o in out]
        return GenerationResult(out, finished, [np.asarray(first)] if return_logits else None)

"""Thinker text generation: jit-compiled prefill and single-token decode over a static-shape KV cache.

- Prompts are right-padded to a length bucket (powers of two from 16), so a new prompt length reuses a compiled
  prefill; the cache length is the bucket plus the decode budget, rounded up to a bucket too.
- Each row writes its next token at its own cache index (its prompt length + step), so rows of different lengths
  decode together; keys beyond a row's index are masked, so the padding written by prefill is never seen.
- Decode reads only the selected experts' weights (`kernels.moe` picks the gather path for few tokens).
- A token generated at unpadded text index n gets rope position n + delta on all three axes (reference §3).
- With `mesh=` the parameters sit at their shardings (omni_jax/sharding.py rules), every compiled call runs under
  that mesh (MoE layers dispatch experts over the `expert` axis), the KV cache is sharded over batch and KV
  heads, and what the host reads back (logits, tokens, hidden states) is replicated. Without a mesh nothing
  changes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni_jax import sharding as S
from omni_jax.errors import OmniJaxError
from omni_jax.kernels.attention import AttentionMask, check_impl
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
    # collect_hidden: {i: float [B, P + steps, H]} the reference's hidden_states[i] (0 = input embeddings) for the
    # prompt (bucket-padded: prompt row b is valid up to lengths[b]) followed by every fed-back generated token.
    hidden: dict | None = None
    logits: list | None = None


def _replicated(tree):
    """Pin arrays the host reads back to be replicated under the active mesh (identity without one)."""
    return jax.tree.map(lambda a: S.constrain(a, (None,) * a.ndim), tree)


def _causal_mask(write_idx=None) -> AttentionMask:
    """Prefill (write_idx None): causal over the prompt. Decode: the new token at cache slot write_idx [B] sees
    slots 0..write_idx; slots past it are never read (kv_lengths)."""
    return AttentionMask(causal=True) if write_idx is None else AttentionMask.decode(write_idx)


class ThinkerGenerator:
    """Holds the compiled prefill/decode functions for one thinker; reuse it across requests."""

    def __init__(self, thinker: Thinker, *, max_context: int | None = None, cache_dtype=None,
                 moe_impl: str = "auto", mesh=None, rules: str | S.Rules = "default", attention_impl: str = "auto"):
        self.moe_impl = moe_impl  # kernels.moe implementation ("auto": gather for decode, grouped for prefill)
        self.attention_impl = check_impl(attention_impl)  # kernels.attention implementation
        self.mesh, self.rules = mesh, S.get_rules(rules)
        self.graphdef, self.state = nnx.split(thinker)
        if mesh is not None:
            S.check_model_fits(mesh, [("thinker", thinker.cfg.text_config)])
            self.state = jax.device_put(self.state, S.named_shardings(self.state, mesh, self.rules))
        self.cfg = thinker.cfg.text_config
        self.max_context = max_context or self.cfg.max_position_embeddings
        self.cache_dtype = cache_dtype
        self._prefill = jax.jit(self._prefill_impl, static_argnames=("cache_len", "collect"))
        self._decode = jax.jit(self._decode_impl, static_argnames=("params", "collect"), donate_argnums=(1,))
        # No donation: the loop returns tokens only, so the cache has no output to alias (XLA would warn).
        self._decode_loop = jax.jit(self._decode_loop_impl, static_argnames=("params", "steps"))
        self._embed = jax.jit(lambda state, ids: nnx.merge(self.graphdef, state).embed(ids))
        self._mm_embed = jax.jit(self._mm_embed_impl, static_argnames=("image_grid", "video_grid"))

    def _on_mesh(self):
        """Context for every compiled call: the mesh and rules (nothing without a mesh)."""
        return S.on_mesh(self.mesh, self.rules)

    def _put(self, x):
        """Host value -> device: replicated over the mesh (a global array on every process) when there is one."""
        if self.mesh is None or isinstance(x, jax.Array):
            return jnp.asarray(x)
        return S.put_global(np.asarray(x), self.mesh)

    def check_context(self, prompt_tokens: int, max_new_tokens: int, what: str = "prompt"):
        """Raise before any work if the request cannot fit the model's context."""
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if prompt_tokens + max_new_tokens > self.max_context:
            raise GenerationError(
                f"{what} of {prompt_tokens} tokens + max_new_tokens {max_new_tokens} = "
                f"{prompt_tokens + max_new_tokens} exceeds the model's context of {self.max_context} tokens "
                "(max_position_embeddings)")

    def multimodal_batch(self, input_ids: list[int], positions: np.ndarray, delta: int, *, audio=None, image=None,
                         video=None) -> PromptBatch:
        """One multimodal prompt -> PromptBatch with merged embeddings and DeepStack features (jit; image and
        video grids are static, so each new grid shape compiles once)."""
        ids, lengths = pad_prompts([input_ids])
        p = ids.shape[1]
        pos = np.zeros((3, 1, p), np.float32)
        pos[:, 0, :len(input_ids)] = positions
        pos[:, 0, len(input_ids):] = positions.max() + 1 + np.arange(p - len(input_ids))  # padding: never read
        with self._on_mesh():
            embeds, deepstack = self._mm_embed(
                self.state, self._put(ids),
                None if audio is None else tuple(self._put(a) for a in audio),
                None if image is None else self._put(image[0]), None if image is None else image[1],
                None if video is None else self._put(video[0]), None if video is None else video[1])
        return PromptBatch(ids, lengths, pos, np.array([delta], np.float32), embeds, deepstack)

    def _mm_embed_impl(self, state, ids, audio, image_px, image_grid, video_px, video_grid):
        model = nnx.merge(self.graphdef, state)
        return model.input_embeddings(ids, audio=audio, image=None if image_px is None else (image_px, image_grid),
                                      video=None if video_px is None else (video_px, video_grid),
                                      attention_impl=self.attention_impl)

    # -- pure functions (jitted) -------------------------------------------------------------------------
    def _empty_cache(self, b, cache_len, dtype):
        c = self.cfg
        shape = (b, cache_len, c.num_key_value_heads, c.head_dim)
        axes = ("batch", "seq", "kv_heads", "head_dim")
        return [(S.constrain(jnp.zeros(shape, dtype), axes), S.constrain(jnp.zeros(shape, dtype), axes))
                for _ in range(c.num_hidden_layers)]

    def _prefill_impl(self, state, embeds, positions, lengths, deepstack, cache_len: int, collect=()):
        model = nnx.merge(self.graphdef, state)
        b, p, _ = embeds.shape
        cache = self._empty_cache(b, cache_len, self.cache_dtype or embeds.dtype)
        embeds = S.constrain(embeds, ("batch", "seq", None))
        hidden, cache, aux = model.model(embeds, positions, _causal_mask(), cache=cache, deepstack=deepstack,
                                         collect_hidden=collect, moe_impl=self.moe_impl,
                                         attention_impl=self.attention_impl)
        last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None], axis=1)[:, 0]
        return S.constrain(model.logits(last), (None, None)), cache, _replicated(aux["hidden"])

    def _decode_impl(self, state, cache, tokens, write_idx, rope_pos, rng, seen, params: SamplingParams,
                     collect=()):
        """tokens [B] (the last sampled ids) -> next ids [B], logits [B, V], new cache."""
        model = nnx.merge(self.graphdef, state)
        b = tokens.shape[0]
        x = model.embed(tokens[:, None])
        pos = jnp.broadcast_to(rope_pos[None, :, None], (3, b, 1))
        hidden, cache, aux = model.model(x, pos, _causal_mask(write_idx), cache=cache, cache_start=write_idx,
                                         collect_hidden=collect, moe_impl=self.moe_impl,
                                         attention_impl=self.attention_impl)
        logits = S.constrain(model.logits(hidden[:, 0]), (None, None))
        nxt = S.constrain(next_token(logits, rng, params, seen=seen), (None,))
        return nxt, logits, cache, _replicated(aux["hidden"])

    def _decode_loop_impl(self, state, cache, tok, lengths, deltas, rng, seen, stop, params: SamplingParams,
                          steps: int):
        """`steps` tokens in one while-loop: tok [B] is the first (already sampled) token. Returns (tokens
        [B, steps] with the first token at 0, finished [B]); the loop ends early once every row has stopped."""
        b = tok.shape[0]
        out = jnp.zeros((b, steps), jnp.int32).at[:, 0].set(tok)
        finished = jnp.isin(tok, stop)
        seen = jnp.zeros((b, 1), bool) if seen is None else seen
        use_seen = params.repetition_penalty != 1.0

        def cond(carry):
            step, _, _, _, _, _, finished = carry
            return (step < steps - 1) & ~jnp.all(finished)

        def body(carry):
            step, tok, cache, rng, seen, out, finished = carry
            if use_seen:
                seen = seen.at[jnp.arange(b), tok].set(True)
            write_idx = lengths + step
            rope_pos = write_idx.astype(jnp.float32) + deltas
            rng, sub = jax.random.split(rng)
            nxt, _, cache, _ = self._decode_impl(state, cache, tok, write_idx, rope_pos, sub,
                                                 seen if use_seen else None, params)
            out = out.at[:, step + 1].set(nxt)
            return step + 1, nxt, cache, rng, seen, out, finished | jnp.isin(nxt, stop)

        carry = (jnp.int32(0), tok, cache, rng, seen, out, finished)
        _, _, _, _, _, out, finished = jax.lax.while_loop(cond, body, carry)
        return out, finished

    # -- host loop -----------------------------------------------------------------------------------------
    def generate(self, batch: PromptBatch, *, max_new_tokens: int, sampling: SamplingParams,
                 stop_ids: tuple[int, ...] = (), dtype=None, return_logits: bool = False,
                 on_token: Callable[[np.ndarray], None] | None = None,
                 collect_hidden: tuple[int, ...] = ()) -> GenerationResult:
        with self._on_mesh():
            return self._generate(batch, max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=stop_ids,
                                  dtype=dtype, return_logits=return_logits, on_token=on_token,
                                  collect_hidden=collect_hidden)

    def _generate(self, batch: PromptBatch, *, max_new_tokens, sampling, stop_ids, dtype, return_logits, on_token,
                  collect_hidden) -> GenerationResult:
        b, p = batch.input_ids.shape
        self.check_context(int(batch.lengths.max()), max_new_tokens)
        cache_len = bucket(p + max_new_tokens)
        model_dtype = dtype or jax.tree.leaves(self.state)[0].dtype
        ids = self._put(batch.input_ids)
        embeds = self._embed(self.state, ids) if batch.embeds is None else batch.embeds
        embeds = embeds.astype(model_dtype)
        lengths = self._put(batch.lengths)
        collect = tuple(sorted(set(collect_hidden)))
        logits, cache, hid = self._prefill(self.state, embeds, self._put(batch.positions), lengths,
                                           batch.deepstack, cache_len=cache_len, collect=collect)
        hidden_steps = {i: [np.asarray(hid[i])] for i in collect}
        vocab = logits.shape[-1]
        seen = None
        if sampling.repetition_penalty != 1.0:
            seen_np = np.zeros((b, vocab), bool)
            for i in range(b):
                seen_np[i, batch.input_ids[i, :batch.lengths[i]]] = True
            seen = self._put(seen_np)
        rng = jax.random.PRNGKey(sampling.seed)
        rng, sub = jax.random.split(rng)
        tok = next_token(logits, sub, sampling, seen=seen)
        out = [[] for _ in range(b)]
        finished = np.zeros(b, bool)
        all_logits = [np.asarray(logits)] if return_logits else None
        stop = np.array(stop_ids, np.int64)
        deltas = jnp.asarray(batch.deltas, jnp.float32)
        static_params = dataclasses.replace(sampling, seed=0)  # the seed only feeds `rng`: not compile-time
        if not (collect or return_logits or on_token is not None):
            # Whole decode in one compiled while-loop: no per-token dispatch or host round trip.
            toks, done = self._decode_loop(self.state, cache, tok, lengths, deltas, rng, seen,
                                           jnp.asarray(stop if stop.size else np.array([-1]), jnp.int32),
                                           params=static_params, steps=max_new_tokens)
            toks, done = np.asarray(toks), np.asarray(done)
            for i in range(b):
                row = toks[i].tolist()
                hits = [j for j, t in enumerate(row) if t in stop]
                out[i] = row[:hits[0] + 1] if hits else row
            return GenerationResult(out, [bool(x) for x in done], None, None)
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
            rope_pos = write_idx.astype(jnp.float32) + deltas
            rng, sub = jax.random.split(rng)
            tok, logits, cache, hid = self._decode(self.state, cache, tok, write_idx, rope_pos, sub, seen,
                                                   params=static_params, collect=collect)
            for i in collect:
                hidden_steps[i].append(np.asarray(hid[i]))
            if return_logits:
                all_logits.append(np.asarray(logits))
        hidden = {i: np.concatenate(v, axis=1) for i, v in hidden_steps.items()} if collect else None
        return GenerationResult(out, finished.tolist(), hidden, all_logits)

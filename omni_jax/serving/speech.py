"""The speech stage of the serving engine: talker + code predictor over their own decode slots, and streaming
Code2Wav (reference §6.2-§6.3, §7.6).

Where streaming must wait for the thinker (reference §6.2). The talker prompt holds the assistant prefix
A[0:4] = (<|im_start|>, "assistant", "\\n", g0) and talker step s adds trailing entry s = A[4 + s] (g_{s+1} for the
usual prompt end), then tts_eos once A is used up, then tts_pad. A is made of the rows the thinker *fed back*:
its last generated token (normally <|im_end|>) is never fed, so a token is known to belong to A only once the
next one has been sampled, or the thinker stopped. Hence:
- the talker prefill waits for the thinker's second token g1 (then g0 is known to be fed), or for its end
  (fewer than 2 tokens: the request ends with an error, as the non-streaming path raises);
- talker step s waits until the thinker has sampled g_{s+2}, or finished (then entry s is g_{s+1}, tts_eos or
  tts_pad). The host gives each talker decode chunk, per slot, the known entries and a step limit; rows past
  their limit are masked on the device and resume in a later chunk.
Everything else streams: frames leave in chunks of `chunk_steps`, and Code2Wav decodes every `group_frames`
frames with `left_context` earlier frames (`WaveStream`), so the first audio chunk leaves after the first few
frames.

The talker's per-slot state mirrors the thinker's (engine.py): KV rows, last codebook-0 code, last final-normed
hidden state, cache index, rope position, sampled-code count and budget, per-row sampling as data (the code
predictor samples with the reference's top-k 50 / top-p 0.8 unless the row is greedy) and `seen` codec ids.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni_jax import sharding as S
from omni_jax.generate import bucket
from omni_jax.sampling import RowSampling, SamplingParams, next_token_rows, row_values
from omni_jax.serving.engine import (
    cache_mask,
    empty_cache,
    layer_stacks,
    place_params,
    prefill_buckets,
    put_row,
    put_tree,
    replicated,
    split_chunks,
    take_row,
)
from omni_jax.serving.protocol import AudioChunk, Request, RequestError
from omni_jax.speech import (
    CP_TOP_K,
    CP_TOP_P,
    SAMPLE_RATE,
    SpeechError,
    SpeechGenerator,
    assistant_start,
    speaker_id,
    talker_sampling,
)


class WaveStream:
    """Code2Wav while frames arrive: every `group_frames` new frames (and at `flush` for a partial group), frames
    [s, e) are decoded with up to `left_context` earlier frames, the window [s - c, e), c = min(left_context, s),
    at one static frame count (left_context + group_frames, right-padded: Code2Wav is causal); the chunk is the
    window's output for absolute samples [max(0, 1920 s - 555), 1920 e - 555). The last 555 samples of a window
    depend on frame e, not produced yet, so they come from the next window (no gap).

    Concatenated, the chunks have the offline length 1920 T - 555 and equal the offline decode wherever each
    window reaches back to frame 0 (T <= left_context + group_frames, or left_context >= T); beyond that they
    differ only through the truncated left context (as the reference's chunked decode does). For T <= 300 the
    reference's waveform is that offline decode."""

    def __init__(self, decode_window, total_upsample: int, tail_loss: int, group_frames: int = 4,
                 left_context: int = 25):
        if group_frames < 1 or left_context < 1:
            # One frame of context is needed to re-create the 555 held-back samples before a window's first frame.
            raise SpeechError(f"group_frames and left_context must be >= 1, got {group_frames}, {left_context}")
        self.decode_window, self.up, self.loss = decode_window, total_upsample, tail_loss
        self.group, self.left = group_frames, left_context
        self.window = left_context + group_frames
        self.frames: list[np.ndarray] = []
        self.start = 0  # first frame not yet emitted

    def add(self, frame: np.ndarray):
        self.frames.append(np.asarray(frame, np.int32))

    def due(self, final: bool = False) -> list[tuple]:
        """The windows now complete (every full group; with `final` also a last partial one), in order: a list of
        (codes int [G, window], start, ctx, end); the caller decodes them (several requests' windows batched)."""
        out = []
        while len(self.frames) - self.start >= self.group or (final and len(self.frames) > self.start):
            start = self.start
            end, ctx = min(start + self.group, len(self.frames)), min(self.left, start)
            codes = np.stack(self.frames[start - ctx:end], axis=1)
            out.append((np.pad(codes, ((0, 0), (0, self.window - codes.shape[1]))), start, ctx, end))
            self.start = end
        return out

    def cut(self, wav: np.ndarray, start: int, ctx: int, end: int) -> np.ndarray:
        """The chunk of a decoded window: absolute samples [max(0, 1920 start - 555), 1920 end - 555)."""
        base = (start - ctx) * self.up
        return wav[max(0, start * self.up - self.loss) - base:end * self.up - self.loss - base]

    def push(self, frame: np.ndarray) -> np.ndarray | None:
        """Add one frame int [G] and decode at once: a chunk when a group is complete."""
        self.add(frame)
        return self._decode(self.due())

    def flush(self) -> np.ndarray | None:
        return self._decode(self.due(final=True))

    def _decode(self, windows) -> np.ndarray | None:
        chunks = [self.cut(self.decode_window(codes), s, c, e) for codes, s, c, e in windows]
        return np.concatenate(chunks) if chunks else None


def _batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def talker_state(slots: int, vocab: int, hidden: int, context: int) -> dict:
    return dict(c0=np.zeros(slots, np.int32), h=np.zeros((slots, hidden), np.float32),
                idx=np.full(slots, context - 1, np.int32), rope=np.zeros((slots, 3), np.float32),
                active=np.zeros(slots, bool), sampled=np.zeros(slots, np.int32), budget=np.zeros(slots, np.int32),
                key=np.zeros((slots, 2), np.uint32), seen=np.zeros((slots, vocab), bool),
                sampling=RowSampling(np.ones(slots, bool), np.ones(slots, np.float32), np.zeros(slots, np.int32),
                                     np.ones(slots, np.float32), np.ones(slots, np.float32)))


class TalkerSlots:
    """Compiled talker steps over `slots` slots: chunked prefill into a slot, and a chunk of `chunk_steps` frames
    for every slot in one static-trip-count `lax.fori_loop` (code predictor, next input, talker step, sampling).
    The KV cache and the scanned layer runs are stored as in engine.py's ThinkerSlots (scan_layers)."""

    def __init__(self, talker, thinker_embed, *, slots: int, context: int, chunk_steps: int, prefill_chunk: int,
                 mesh=None, rules="default", moe_impl: str = "auto", attention_impl: str = "auto",
                 scan_layers: bool = True):
        self.attention_impl = attention_impl
        self.tcfg = talker.cfg
        self.cfg = talker.cfg.text_config
        self.mesh, self.rules = mesh, S.get_rules(rules)
        self.graphdef, self.state = place_params(talker, mesh, self.rules, "talker", self.cfg)
        self.runs = talker.model.scan_runs() if scan_layers else {}
        self.state, self.stacks = layer_stacks(self.state, self.runs, mesh, self.rules)
        self.thinker_embed = thinker_embed  # [thinker vocab, thinker H]: text rows are projected on the device
        self.dtype = jax.tree.leaves(self.state)[0].dtype
        self.slots, self.chunk_steps, self.moe_impl = slots, chunk_steps, moe_impl
        self.prefill_chunk = min(bucket(prefill_chunk), bucket(context))
        self.context = -(-context // self.prefill_chunk) * self.prefill_chunk
        self.vocab, self.eos = self.cfg.vocab_size, self.tcfg.codec_eos_token_id
        self.groups = self.tcfg.num_code_groups
        suppress = np.zeros(self.vocab, bool)
        suppress[max(self.vocab - 1024, 0):] = True  # the reference's suppress_tokens: [vocab-1024, vocab) but EOS
        suppress[self.eos] = False
        self.suppress = suppress
        self._prefill = jax.jit(self._prefill_impl, donate_argnums=(2,))
        self._decode = jax.jit(self._decode_impl, donate_argnums=(2, 3))
        self._insert = jax.jit(_set_row, donate_argnums=(0,))
        self._first = jax.jit(self._first_impl)
        with self.on_mesh():
            self.cache = jax.jit(lambda: empty_cache(self.cfg, slots, self.context, self.dtype))()
            self.dstate = self.put(talker_state(slots, self.vocab, self.cfg.hidden_size, self.context))

    def on_mesh(self):
        return S.on_mesh(self.mesh, self.rules)

    def put(self, tree):
        return put_tree(tree, self.mesh)

    def _prefill_impl(self, state, stacks, cache, slot, start, embeds, positions, last):
        """embeds [1, T, H], positions float32 [3, 1, T] into `slot` at cache index `start` -> (logits [V] and
        final-normed hidden [H] at chunk index `last`, cache)."""
        talker = nnx.merge(self.graphdef, state)
        t = embeds.shape[1]
        begin = jnp.reshape(start, (1,))
        row = take_row(cache, slot)
        logits, hidden, row = talker(embeds.astype(self.dtype), positions, cache_mask(begin, t, self.context),
                                     cache=row, cache_start=begin, moe_impl=self.moe_impl,
                                     attention_impl=self.attention_impl, stacks=stacks)
        cache = put_row(cache, row, slot)
        at = lambda x: jax.lax.dynamic_index_in_dim(x[0], last, 0, keepdims=False)  # noqa: E731
        return replicated(at(logits)), replicated(at(hidden)), cache

    def _first_impl(self, logits, key, row):
        p = RowSampling(**{k: jnp.asarray(v)[None] for k, v in row.items()})
        _, k_talker = jax.random.split(jax.random.fold_in(key, 0))
        return next_token_rows(logits[None], k_talker[None], p, seen=jnp.zeros((1, self.vocab), bool),
                               suppress=jnp.asarray(self.suppress))[0]

    def _decode_impl(self, state, stacks, cache, ds, text_ids, limit, thinker_embed):
        """chunk_steps frames per slot. text_ids int [slots, K]: the trailing entry each step adds (thinker ids);
        limit int [slots]: steps each row may run in this chunk (its known entries). Returns (cache, ds, frames
        int [slots, K, G], c0 int [slots, K] (the code sampled after each frame), emitted bool [slots, K])."""
        talker = nnx.merge(self.graphdef, state)
        b, k, g = self.slots, self.chunk_steps, self.groups
        rows = jnp.arange(b)
        suppress = jnp.asarray(self.suppress)
        text = talker.text_projection(jnp.take(thinker_embed, text_ids, axis=0).astype(self.dtype))  # [B, K, H]

        def body(i, carry):
            cache, ds, frames, c0s, emitted = carry
            act = ds["active"] & (i < limit)
            key = jax.vmap(jax.random.fold_in)(ds["key"], ds["sampled"])
            k_cp, k_talker = jnp.split(jax.vmap(jax.random.split)(key), 2, axis=1)
            k_cp, k_talker = k_cp[:, 0], k_talker[:, 0]
            sp = ds["sampling"]
            cp_rows = RowSampling(sp.greedy, jnp.ones_like(sp.temperature), jnp.full_like(sp.top_k, CP_TOP_K),
                                  jnp.full_like(sp.top_p, CP_TOP_P), jnp.ones_like(sp.repetition_penalty))
            pick = lambda logits, step: next_token_rows(  # noqa: E731
                logits, jax.vmap(jax.random.fold_in, (0, None))(k_cp, step), cp_rows)
            with jax.named_scope("code_predictor"):
                residual = talker.code_predictor.predict_frame(ds["h"].astype(self.dtype), talker.embed_codes(ds["c0"]),
                                                               pick=pick, attention_impl=self.attention_impl)
            with jax.named_scope("talker_step"):
                x = talker.next_frame_embedding(ds["c0"], residual) + text[:, i]
                idx = jnp.where(act, ds["idx"], self.context - 1)
                pos = jnp.swapaxes(ds["rope"], 0, 1)[:, :, None]  # [3, B, 1]
                logits, hidden, cache = talker(x[:, None], pos, cache_mask(idx, 1, self.context), cache=cache,
                                               cache_start=idx, moe_impl=self.moe_impl,
                                               attention_impl=self.attention_impl, stacks=stacks)
            with jax.named_scope("sample_codec"):
                nxt = next_token_rows(logits[:, 0], k_talker, sp, seen=ds["seen"], suppress=suppress)
            frame = jnp.concatenate([ds["c0"][:, None], residual], axis=1)
            done = (nxt == self.eos) | (ds["sampled"] + 1 >= ds["budget"])
            ds = dict(ds, c0=jnp.where(act, nxt, ds["c0"]), h=jnp.where(act[:, None], hidden[:, 0], ds["h"]),
                      idx=ds["idx"] + act, rope=ds["rope"] + act[:, None], sampled=ds["sampled"] + act,
                      active=ds["active"] & ~(act & done),
                      seen=ds["seen"].at[rows, nxt].set(ds["seen"][rows, nxt] | act))
            return (cache, ds, frames.at[:, i].set(frame), c0s.at[:, i].set(jnp.where(act, nxt, -1)),
                    emitted.at[:, i].set(act))

        init = (cache, ds, jnp.zeros((b, k, g), jnp.int32), jnp.full((b, k), -1, jnp.int32), jnp.zeros((b, k), bool))
        cache, ds, frames, c0s, emitted = jax.lax.fori_loop(0, k, body, init)
        return cache, ds, replicated(frames), replicated(c0s), replicated(emitted)

    # -- host wrappers -------------------------------------------------------------------------------------------
    def prefill(self, slot: int, start: int, embeds: np.ndarray, positions: np.ndarray, last: int):
        with self.on_mesh():
            logits, hidden, self.cache = self._prefill(self.state, self.stacks, self.cache, np.int32(slot),
                                                       np.int32(start), self.put(np.asarray(embeds, np.float32)[None]),
                                                       self.put(np.asarray(positions, np.float32)[:, None]),
                                                       np.int32(last))
        return logits, hidden

    def first_code(self, logits, sampling: SamplingParams) -> int:
        key = np.asarray(jax.random.key_data(jax.random.PRNGKey(sampling.seed)))
        with self.on_mesh():
            return int(self._first(logits, key, self.put(row_values(sampling))))

    def insert(self, slot: int, *, c0: int, h, idx: int, rope: np.ndarray, budget: int, sampling: SamplingParams):
        """Start decoding `slot`: c0 (sampled by the prefill, code 1 of `budget`) is expanded first; its frame is
        fed at cache index idx with rope position `rope` [3]."""
        seen = np.zeros(self.vocab, bool)
        seen[c0] = True
        row = dict(c0=np.int32(c0), h=h, idx=np.int32(idx), rope=np.asarray(rope, np.float32),
                   active=bool(c0 != self.eos and budget > 1), sampled=np.int32(1), budget=np.int32(budget),
                   key=np.asarray(jax.random.key_data(jax.random.PRNGKey(sampling.seed))), seen=seen,
                   sampling=row_values(sampling))
        with self.on_mesh():
            self.dstate = self._insert(self.dstate, np.int32(slot), self.put(row))

    def deactivate(self, slot: int):
        with self.on_mesh():
            self.dstate = self._insert(self.dstate, np.int32(slot), self.put(dict(active=False)))

    def decode(self, text_ids: np.ndarray, limit: np.ndarray):
        with self.on_mesh():
            self.cache, self.dstate, frames, c0s, emitted = self._decode(
                self.state, self.stacks, self.cache, self.dstate, self.put(np.asarray(text_ids, np.int32)),
                self.put(np.asarray(limit, np.int32)), self.thinker_embed)
        return np.asarray(frames), np.asarray(c0s), np.asarray(emitted), np.asarray(self.dstate["active"])

    def warmup(self):
        h = self.cfg.hidden_size
        for t in prefill_buckets(self.prefill_chunk):
            logits, _ = self.prefill(0, 0, np.zeros((t, h), np.float32), np.zeros((3, t), np.float32), 0)
            self.first_code(logits, SamplingParams())
        self.insert(0, c0=0, h=np.zeros(h, np.float32), idx=0, rope=np.zeros(3), budget=0, sampling=SamplingParams())
        self.deactivate(0)
        self.decode(np.zeros((self.slots, self.chunk_steps), np.int32), np.zeros(self.slots, np.int32))


def _set_row(tree: dict, slot, row: dict) -> dict:
    from omni_jax.serving.engine import _set_row as set_row

    return set_row(tree, slot, row)


@dataclasses.dataclass
class TalkJob:
    """Host-side state of one request's talker part."""

    sampling: SamplingParams
    budget: int
    wave: WaveStream | None
    prompt_ids: np.ndarray | None = None  # thinker prompt (streaming from the thinker)
    a_start: int = 0
    trailing: list | None = None  # explicit trailing ids (a prompt built in advance: complete)
    tp: object = None  # omni_jax.speech.TalkerPrompt once built
    slot: int | None = None
    state: str = "waiting"  # waiting -> prefill -> running -> done
    chunks: list = dataclasses.field(default_factory=list)
    next_chunk: int = 0
    steps: int = 0  # frames produced
    frames: list = dataclasses.field(default_factory=list)
    codec_tokens: list = dataclasses.field(default_factory=list)
    finished: bool = False  # codec EOS sampled
    samples: int = 0


class SpeechStage:
    """Talker slots + Code2Wav for the engine (scheduler.Engine drives it through `step`)."""

    def __init__(self, engine, model, *, slots: int, context: int | None, chunk_steps: int, group_frames: int,
                 left_context: int, mesh=None, rules="default", prefill_chunk: int = 256, moe_impl: str = "auto",
                 attention_impl: str = "auto"):
        self.engine = engine
        self.cfg = engine.cfg
        self.sg = SpeechGenerator(self.cfg, model.thinker, model.talker, model.code2wav, mesh=mesh, rules=rules,
                                  moe_impl=moe_impl)
        th = engine.thinker
        embed = th.state["model"]["embed_tokens"]["embedding"][...]
        self.talker = TalkerSlots(model.talker, embed, slots=slots, context=context or engine.max_context + 16,
                                  chunk_steps=chunk_steps, prefill_chunk=min(prefill_chunk, th.prefill_chunk),
                                  mesh=mesh, rules=rules, moe_impl=moe_impl, attention_impl=attention_impl)
        self.group_frames, self.left_context = group_frames, left_context
        self.free = list(range(slots))
        self.pad_id, self.eos_id = self.cfg.tts_pad_token_id, self.cfg.tts_eos_token_id

    def check_request(self, request: Request):
        try:
            speaker_id(self.cfg, request.speaker)
        except SpeechError as e:
            raise RequestError(str(e), param="speaker") from e
        if request.talker_max_new_tokens < 2:
            raise RequestError(f"talker_max_new_tokens must be >= 2 (N sampled codes give at most N-1 frames), got "
                               f"{request.talker_max_new_tokens}", param="talker_max_new_tokens")

    def warmup(self):
        self.talker.warmup()
        h = self.cfg.talker_config.thinker_hidden_size
        self.sg.project_rows(np.zeros((1, h), np.float32), np.zeros((1, h), np.float32))
        self.sg._codec_rows([0] * 6)
        window = self.left_context + self.group_frames
        b = 1
        while True:  # every batch size _code2wav uses
            self.sg.decode_batch(np.zeros((b, self.talker.groups, window), np.int32))
            if b >= self.talker.slots:
                break
            b *= 2

    def _wave(self) -> WaveStream:
        return WaveStream(self._decode_window, self.sg.total_upsample, self.sg.tail_loss, self.group_frames,
                          self.left_context)

    def _decode_window(self, codes: np.ndarray) -> np.ndarray:
        return self.sg.decode_batch(codes[None])[0]

    # -- thinker -> talker -------------------------------------------------------------------------------------
    def on_thinker_tokens(self, job):
        """Called after new thinker tokens (a speech request): build and queue the talker job when ready."""
        if job.talk is None:
            r = job.request
            ids = np.asarray(job.prompt.input_ids, np.int64)
            job.talk = TalkJob(r.talker_sampling or talker_sampling(), r.talker_max_new_tokens,
                               self._wave() if r.stream_audio else None,
                               prompt_ids=ids, a_start=assistant_start(ids, self.cfg))

    def on_thinker_done(self, job):
        if job.talk is None:
            self.on_thinker_tokens(job)
        if job.talk.state == "done":  # the talker ended first (codec EOS or its budget)
            self.engine._finish(job, job.finish_reason)

    def submit_prompt(self, job, tp, sampling: SamplingParams, budget: int, stream_audio: bool = True, wave=None):
        """A talker prompt built in advance (complete trailing ids): e.g. OmniSession.speak_batch's rows."""
        job.talk = TalkJob(sampling, budget, (wave or self._wave()) if stream_audio else None, tp=tp,
                           trailing=[int(t) for t in tp.trailing_ids])

    # -- what omni_jax.speech.SpeechGenerator offered, on the engine ----------------------------------------------
    def __getattr__(self, name):
        """Talker-prompt building and Code2Wav (talker_prompt(s), waveform(s), decode, total_upsample, ...) are
        SpeechGenerator's."""
        if name in ("sg", "engine", "talker"):
            raise AttributeError(name)
        return getattr(self.sg, name)

    @property
    def state(self):
        """The talker's parameters as the engine runs them (assignable, e.g. to edit weights in a test)."""
        return self.talker.state

    @state.setter
    def state(self, value):
        self.talker.state = value

    def _talk(self, tps, max_new_tokens, sampling, stream_audio=False, wave=None):
        if max_new_tokens < 2:
            raise SpeechError(f"talker max_new_tokens must be >= 2 (N sampled codes give at most N-1 frames), got "
                              f"{max_new_tokens}")
        if not tps or any(tp is None for tp in tps):
            raise SpeechError("the talker needs at least one talker prompt")
        return [self.engine.submit_talker(tp, sampling=sampling or talker_sampling(), max_new_tokens=max_new_tokens,
                                          stream_audio=stream_audio, wave=wave) for tp in tps]

    def generate_codes_batch(self, tps, *, max_new_tokens: int = 4096, sampling: SamplingParams | None = None):
        """Codec frames of talker prompts built in advance, decoded together in the talker slots: one
        omni_jax.speech.SpeechResult per prompt. Every row uses `sampling` with its own PRNG stream."""
        from omni_jax.speech import SpeechResult

        handles = self._talk(tps, max_new_tokens, sampling)
        fins = [ev[-1] for ev in self.engine.drive(handles)]
        for f in fins:
            if f.finish_reason == "error":
                raise SpeechError(f.error)
        return [SpeechResult(f.codes, list(f.codec_tokens), bool(f.codec_finished)) for f in fins]

    def generate_codes(self, tp, *, max_new_tokens: int = 4096, sampling: SamplingParams | None = None):
        return self.generate_codes_batch([tp], max_new_tokens=max_new_tokens, sampling=sampling)[0]

    def stream(self, tp, *, max_new_tokens: int = 4096, sampling: SamplingParams | None = None,
               group_frames: int | None = None, left_context: int | None = None, state: dict | None = None):
        """AudioChunks of one talker prompt built in advance, as the engine streams them (`WaveStream` with the
        given window, default the engine's). `state` receives "codec_tokens" and "finished"."""
        wave = WaveStream(self._decode_window, self.sg.total_upsample, self.sg.tail_loss,
                          self.group_frames if group_frames is None else group_frames,
                          self.left_context if left_context is None else left_context)
        handle = self._talk([tp], max_new_tokens, sampling, stream_audio=True, wave=wave)[0]
        from omni_jax.inference import _drain

        state = {} if state is None else state
        while True:
            if self.engine._thread is None and not handle.done:
                self.engine.step()
            for ev in _drain(handle):
                if isinstance(ev, AudioChunk):
                    yield ev
                elif ev.finish_reason == "error":
                    raise SpeechError(ev.error)
                else:
                    state.update(codec_tokens=list(ev.codec_tokens), finished=bool(ev.codec_finished))
                    return
            if self.engine._thread is not None:
                handle._done.wait(0.01)

    def prefill_logits(self, tp) -> np.ndarray:
        """Talker prefill logits at the last prompt row, fp32 [V] (for tests; uses a free talker slot)."""
        if not self.free:
            raise SpeechError("no free talker slot")
        slot = self.free[0]
        n = tp.embeds.shape[0]
        for start, valid, size in split_chunks(n, self.talker.prefill_chunk):
            emb = np.zeros((size, tp.embeds.shape[1]), np.float32)
            emb[:valid] = tp.embeds[start:start + valid]
            pos = np.zeros((3, size), np.float32)
            pos[:, :valid] = tp.positions[:, start:start + valid]
            logits, _ = self.talker.prefill(slot, start, emb, pos, valid - 1)
        return np.asarray(logits, np.float32)

    def _entry(self, job, j: int):
        """Trailing entry j of a streaming request (a thinker id), or None while unknown."""
        t = job.talk
        if t.trailing is not None:
            return t.trailing[j] if j < len(t.trailing) else self.pad_id
        p_a = len(t.prompt_ids) - t.a_start
        i = 4 + j
        if i < p_a:
            return int(t.prompt_ids[t.a_start + i])
        g, done = i - p_a, job.finish_reason is not None
        if g + 1 < len(job.tokens):
            return job.tokens[g]
        if not done:
            return None
        fed_total = p_a + len(job.tokens) - 1
        return self.eos_id if i == fed_total else self.pad_id

    def _build_prompt(self, job):
        """The talker prompt of a streaming request once A[0:4] are known (None while waiting)."""
        t = job.talk
        p_a = len(t.prompt_ids) - t.a_start
        need = max(0, 4 - p_a)  # generated tokens in A[0:4]
        done = job.finish_reason is not None
        if len(job.tokens) < need + 1 and not done:
            return None
        fed = job.tokens[:min(need, max(len(job.tokens) - 1, 0))]
        n = len(t.prompt_ids)
        if len(fed) < need:
            raise SpeechError(f"speech output needs at least 2 generated thinker tokens (the assistant prefix uses "
                              f"the first one and the talker is fed the rest); the thinker produced {len(job.tokens)}")
        th = self.engine.thinker
        embeds = job.prompt_hidden[0]
        rows_e = np.concatenate([embeds[:n], th.embed_tokens(np.asarray(fed))]) if fed else embeds[:n]
        k = self.cfg.talker_config.accept_hidden_layer
        rows_k = np.concatenate([job.prompt_hidden[k][:n], np.zeros((len(fed), rows_e.shape[1]), np.float32)])
        p = job.prompt
        media = dict(audio_seqlens=None if p.audio is None else [int(f) for f in p.audio[1]],
                     image_grid=None if p.image is None else list(p.image[1]),
                     video_grid=None if p.video is None else list(p.video[1]),
                     second_per_grids=list(p.video_second_per_grid) or None)
        cut = t.a_start + 4
        return self.sg._row_prompt(t.prompt_ids, rows_e[:cut], rows_k[:cut], a_start=t.a_start, trailing_len=1,
                                   first_eos=None, spk=speaker_id(self.cfg, job.request.speaker), media=media)

    # -- the stage's loop turn -----------------------------------------------------------------------------------
    def step(self, jobs):
        eng = self.engine
        for job in jobs:
            t = job.talk
            if t.state == "waiting" and self.free:
                eng._guard(job, self._start, job)
        pre = next((j for j in jobs if j.talk.state == "prefill" and j.state != "done"), None)
        if pre is not None:
            eng._guard(pre, self._prefill_chunk, pre)
        running = [j for j in jobs if j.talk.state == "running" and j.state != "done"]
        if running:
            self._decode(running)
            self._code2wav(running)

    def _start(self, job):
        t = job.talk
        if t.tp is None:
            t.tp = self._build_prompt(job)
            if t.tp is None:
                return
        n = t.tp.embeds.shape[0]
        if n + 2 > self.talker.context:
            raise SpeechError(f"the talker prompt of {n} rows does not fit the talker context of "
                              f"{self.talker.context}")
        t.budget = min(t.budget, self.talker.context - n + 1)  # frames beyond the context cannot be cached
        t.slot = self.free.pop(0)
        t.state = "prefill"
        t.chunks = split_chunks(n, self.talker.prefill_chunk)

    def _prefill_chunk(self, job):
        t = job.talk
        start, valid, size = t.chunks[t.next_chunk]
        emb = np.zeros((size, t.tp.embeds.shape[1]), np.float32)
        emb[:valid] = t.tp.embeds[start:start + valid]
        pos = np.zeros((3, size), np.float32)
        pos[:, :valid] = t.tp.positions[:, start:start + valid]
        logits, hidden = self.talker.prefill(t.slot, start, emb, pos, valid - 1)
        t.next_chunk += 1
        if t.next_chunk < len(t.chunks):
            return
        c0 = self.talker.first_code(logits, t.sampling)
        t.codec_tokens.append(c0)
        n = t.tp.embeds.shape[0]
        t.finished = c0 == self.talker.eos
        if t.finished or t.budget <= 1:
            self._talker_done(job)
            return
        self.talker.insert(t.slot, c0=c0, h=hidden, idx=n, rope=t.tp.positions[:, -1] + 1, budget=t.budget,
                           sampling=t.sampling)
        t.state = "running"

    def _decode(self, running):
        k, slots = self.talker.chunk_steps, self.talker.slots
        text_ids = np.full((slots, k), self.pad_id, np.int32)
        limit = np.zeros(slots, np.int32)
        for job in running:
            t = job.talk
            for i in range(k):
                e = self._entry(job, t.steps + i)
                if e is None:
                    break
                text_ids[t.slot, i] = e
                limit[t.slot] = i + 1
        frames, c0s, emitted, active = self.talker.decode(text_ids, limit)
        for job in running:
            self.engine._guard(job, self._take_frames, job, frames, c0s, emitted, active)

    def _take_frames(self, job, frames, c0s, emitted, active):
        t = job.talk
        for i in np.nonzero(emitted[t.slot])[0]:
            t.frames.append(frames[t.slot, i])
            t.codec_tokens.append(int(c0s[t.slot, i]))
            t.steps += 1
            if t.wave is not None:
                t.wave.add(frames[t.slot, i])
        if not active[t.slot]:
            t.finished = t.codec_tokens[-1] == self.talker.eos
            t.state = "ending"  # its last Code2Wav window goes out with this turn's batch

    def _code2wav(self, jobs):
        """Decode every complete Code2Wav window of these requests in batches (one call per `slots` windows,
        padded to a power of two), send the chunks in order, and end the requests whose talker has stopped."""
        work = [(job, w) for job in jobs if job.talk.wave is not None and job.state != "done"
                for w in job.talk.wave.due(final=job.talk.state == "ending")]
        size = self.talker.slots
        shapes = sorted({w[0].shape for _, w in work})  # one window size per engine; a test's own stream may differ
        parts = [p for shape in shapes for p in _batches([x for x in work if x[1][0].shape == shape], size)]
        for part in parts:
            codes = np.stack([w[0] for _, w in part])
            b = min(1 << (len(part) - 1).bit_length(), bucket(size, 1))
            wav = self.sg.decode_batch(np.pad(codes, ((0, b - len(part)), (0, 0), (0, 0))))
            for (job, (_, s, c, e)), row in zip(part, wav):
                self._send(job, job.talk.wave.cut(row, s, c, e), e - s)
        for job in jobs:
            if job.talk.state == "ending" and job.state != "done":
                self._talker_done(job)

    def _send(self, job, samples: np.ndarray, frames: int):
        t = job.talk
        t.samples += samples.shape[0]
        job.handle.put(AudioChunk(samples, frames))

    def _talker_done(self, job):
        t = job.talk
        if t.wave is not None:
            start = t.wave.start
            chunk = t.wave.flush()  # nothing left after _code2wav; a talker that ended at its prefill: no frames
            if chunk is not None:
                self._send(job, chunk, len(t.wave.frames) - start)
        t.state = "done"
        self._free_slot(t)
        if job.state == "talking":  # the thinker part has ended too
            self.engine._finish(job, job.finish_reason)

    def _free_slot(self, t):
        if t.slot is not None:
            if t.state in ("running",):
                self.talker.deactivate(t.slot)
            self.free.append(t.slot)
            self.free.sort()
            t.slot = None

    def release(self, job) -> dict:
        """Free the request's talker slot (cancel / error / end) and return its Finished fields."""
        t = job.talk
        if t.slot is not None:
            self.talker.deactivate(t.slot)
            self._free_slot(t)
        t.state = "done"
        g = self.talker.groups
        codes = np.stack(t.frames, axis=1) if t.frames else np.zeros((g, 0), np.int32)
        return dict(codes=codes, codec_tokens=list(t.codec_tokens), codec_finished=bool(t.finished),
                    num_codec_frames=len(t.frames), audio_seconds=t.samples / SAMPLE_RATE)

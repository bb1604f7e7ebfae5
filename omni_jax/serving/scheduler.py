"""The serving engine: a bounded waiting queue, admission into fixed decode slots, and one loop (a background
thread, or driven inline by `run`) that interleaves prefill chunks, thinker decode chunks and the speech stage.

A request is a state machine: waiting -> prefill (one chunk per loop turn, so running requests keep decoding
between the chunks of a long prompt) -> running (decoding in its slot) -> finished (stop / length / cancelled /
error). With speech it also has a talker stage (serving/speech.py) that may still run after its thinker part
finished. Cancellation is a flag the loop reads at the top of every turn: the request's slots in every stage are
freed at once and its stream ends with Finished("cancelled"). An exception while serving one request ends only
that request with Finished("error").

`Engine.submit` validates in the caller's thread (unknown speaker, max_new_tokens < 1, prompt too long for the
context, unreadable media: RequestError with `param`), so a server can answer 400 before queueing.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
import time
import traceback

import numpy as np

from omni_jax.errors import OmniJaxError
from omni_jax.processing.audio import HOP_LENGTH, SAMPLING_RATE
from omni_jax.prompt import ThinkerPrompt, prepare_thinker_prompt
from omni_jax.sampling import SamplingParams
from omni_jax.serving.engine import CompileCounter, ThinkerSlots, split_chunks
from omni_jax.serving.protocol import AudioChunk, Finished, QueueFull, Request, RequestError, RequestHandle, TextDelta

AUDIO_FRAMES_PER_SECOND = SAMPLING_RATE // HOP_LENGTH  # mel frames (100 per second)


@dataclasses.dataclass
class _Job:
    """Engine-side state of one request."""

    handle: RequestHandle
    prompt: ThinkerPrompt
    max_new: int
    sampling: SamplingParams
    state: str = "waiting"  # waiting -> prefill -> running -> talking -> done
    slot: int | None = None
    chunks: list = dataclasses.field(default_factory=list)
    next_chunk: int = 0
    embeds: np.ndarray | None = None
    deepstack: list | None = None
    tokens: list = dataclasses.field(default_factory=list)  # generated ids, a final stop id included
    text: str = ""  # text sent so far
    finish_reason: str | None = None
    prompt_hidden: dict = dataclasses.field(default_factory=dict)  # {i: float [L, H]} for the talker
    talk: object = None  # serving.speech talker job
    t_submit: float = 0.0

    @property
    def request(self) -> Request:
        return self.handle.request


def talker_sampling_default() -> SamplingParams:
    from omni_jax.speech import talker_sampling

    return talker_sampling()


def prompt_token_details(prompt: ThinkerPrompt, cfg) -> dict:
    t = cfg.thinker_config
    ids = np.asarray(prompt.input_ids)
    audio, image, video = (int((ids == x).sum()) for x in (t.audio_token_id, t.image_token_id, t.video_token_id))
    out = {"text_tokens": int(ids.size - audio - image - video)}
    for name, n in (("audio_tokens", audio), ("image_tokens", image), ("video_tokens", video)):
        if n:
            out[name] = n
    return out


class Engine:
    """One model served to many requests. Build with `Engine.from_dir`; `submit` requests; `start()` runs the loop
    in a background thread (`shutdown()` stops it), or `run(request)` drives it inline for one caller.

    Holds: `tokenizer`, `cfg`, `defaults` (generation_config), `thinker` (ThinkerSlots), `speech`
    (serving.speech.SpeechStage or None), `model_name`. max_audio_seconds: longest audio input (default: as much
    as the context holds, 13 tokens per second); the audio encoder is compiled for buckets up to it and a longer
    audio is a RequestError. warmup_image_sizes: (height, width) image sizes whose vision-encoder grid `warmup()`
    compiles (other grids compile on first use). release_module: the thinker's scanned decoder layers move into
    the engine (ThinkerSlots; the module can no longer run them): `from_dir` does so for the model it loads."""

    def __init__(self, model, cfg, tokenizer, defaults, *, model_name: str, max_slots: int = 4, max_queue: int = 64,
                 max_context: int | None = None, chunk_steps: int = 16, prefill_chunk: int = 256, speech: bool = False,
                 mesh=None, rules="default", talker_context: int | None = None, audio_group_frames: int = 4,
                 audio_left_context: int = 25, moe_impl: str = "auto", attention_impl: str = "auto",
                 max_audio_seconds: float | None = None, warmup_image_sizes=(), release_module: bool = False):
        from omni_jax.kernels.impls import check_impl

        check_impl("moe", moe_impl)
        check_impl("attention", attention_impl)
        self.cfg, self.tokenizer, self.defaults, self.model_name = cfg, tokenizer, defaults, model_name
        self.max_slots, self.max_queue = max_slots, max_queue
        self.stop_ids = tuple(dict.fromkeys((cfg.im_end_token_id, *defaults.eos_token_ids)))
        tc = cfg.thinker_config.text_config
        context = max_context or min(tc.max_position_embeddings, 4096)
        self.max_context = min(context, tc.max_position_embeddings)
        self._compiles0 = CompileCounter().count()
        accept = cfg.talker_config.accept_hidden_layer if speech else None
        chunk_s = 2 * cfg.thinker_config.audio_config.n_window / AUDIO_FRAMES_PER_SECOND
        if max_audio_seconds is not None and not max_audio_seconds > 0:
            raise OmniJaxError(f"max_audio_seconds must be > 0, got {max_audio_seconds}")
        self.warmup_image_sizes = tuple(warmup_image_sizes)
        self.thinker = ThinkerSlots(model.thinker, slots=max_slots, context=self.max_context, stop_ids=self.stop_ids,
                                    chunk_steps=chunk_steps, prefill_chunk=prefill_chunk,
                                    collect=() if accept is None else (0, accept), mesh=mesh, rules=rules,
                                    moe_impl=moe_impl, attention_impl=attention_impl, release_module=release_module,
                                    max_audio_chunks=None if max_audio_seconds is None else
                                    math.ceil(max_audio_seconds / chunk_s - 1e-9))
        # Audio longer than this is refused before it is decoded (the largest audio bucket when not given).
        self.max_audio_seconds = max_audio_seconds or self.thinker.max_audio_chunks * chunk_s
        self.speech = None
        if speech:
            from omni_jax.serving.speech import SpeechStage

            self.speech = SpeechStage(self, model, slots=max_slots, context=talker_context, chunk_steps=chunk_steps,
                                      group_frames=audio_group_frames, left_context=audio_left_context,
                                      mesh=mesh, rules=rules, moe_impl=moe_impl, attention_impl=attention_impl)
        self._lock = threading.Condition()
        self._waiting: collections.deque[_Job] = collections.deque()
        self._jobs: list[_Job] = []  # admitted (prefill / running / talking)
        self._free = list(range(max_slots))
        self._thread: threading.Thread | None = None
        self._stop = False
        self._loop_lock = threading.Lock()  # one driver of the loop at a time
        self.counters = collections.Counter()
        self.warm = False

    @classmethod
    def from_dir(cls, model_dir: str, *, dtype: str = "float32", mesh=None, rules: str = "default", max_slots: int = 4,
                 max_queue: int = 64, speech: bool | None = None, max_context: int | None = None,
                 warmup: bool = True, **kwargs) -> Engine:
        """Load a model directory (HF or Orbax). speech: load the talker + Code2Wav (None: when the checkpoint has
        them). mesh: a spec string ("data=2,expert=4") or a Mesh. warmup: compile every step now."""
        import os

        from omni_jax.inference import GenerationDefaults, check_speech_available, load_model, speech_available
        from omni_jax.processing.tokenizer import Tokenizer

        if mesh is not None and isinstance(mesh, str):
            from omni_jax import sharding

            mesh = sharding.make_mesh(mesh)
        if speech is None:
            speech = speech_available(model_dir)
        if speech:
            check_speech_available(model_dir)
        parts = ("thinker", "talker", "code2wav") if speech else ("thinker",)
        model, cfg = load_model(model_dir, dtype=dtype, parts=parts, mesh=mesh, rules=rules)
        kwargs.setdefault("release_module", True)  # the engine owns the model it loaded
        engine = cls(model, cfg, Tokenizer.from_dir(model_dir), GenerationDefaults.from_dir(model_dir),
                     model_name=os.path.basename(os.path.normpath(model_dir)), max_slots=max_slots,
                     max_queue=max_queue, max_context=max_context, speech=speech, mesh=mesh, rules=rules, **kwargs)
        if warmup:
            engine.warmup()
        return engine

    # -- public API ------------------------------------------------------------------------------------------
    def warmup(self):
        """Compile every step (prefill buckets, decode chunk, audio buckets and the media merge, the vision encoder
        for `warmup_image_sizes`, talker and Code2Wav steps)."""
        with self._loop_lock:
            vision = self.cfg.thinker_config.vision_config
            self.thinker.warmup(deepstack_levels=len(vision.deepstack_visual_indexes) if vision is not None else 0,
                                image_sizes=self.warmup_image_sizes)
            if self.speech is not None:
                self.speech.warmup()
        self.warm = True

    @property
    def compilations(self) -> int:
        """XLA compilations in this process since the engine was created."""
        return CompileCounter.count() - self._compiles0

    def sampling(self, *, greedy=None, temperature=None, top_k=None, top_p=None, seed=0,
                 repetition_penalty=None) -> SamplingParams:
        """SamplingParams with generation_config.json's defaults for what is not given."""
        return self.defaults.sampling(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                      repetition_penalty=repetition_penalty)

    def prepare(self, request: Request) -> ThinkerPrompt:
        """Validate a request and build its prompt (media loaded); RequestError on bad input."""
        if request.max_new_tokens is not None and request.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens must be >= 1, got {request.max_new_tokens}", param="max_tokens")
        if request.return_hidden and self.speech is None:
            raise RequestError("return_hidden needs an engine with speech output", param="return_hidden")
        if request.speech:
            if self.speech is None:
                raise RequestError("this model is served without speech output (no talker / code2wav loaded)",
                                   param="modalities")
            self.speech.check_request(request)
        try:
            prompt = prepare_thinker_prompt(self.tokenizer, self.cfg, request.messages,
                                            max_audio_seconds=self.max_audio_seconds,
                                            use_audio_in_video=request.use_audio_in_video)
            if prompt.audio is not None:
                self.thinker.check_audio(prompt.audio[1])
        except RequestError:
            raise
        except (OmniJaxError, FileNotFoundError, IsADirectoryError, PermissionError) as e:
            raise RequestError(str(e), param="messages") from e
        if not prompt.input_ids:
            raise RequestError("the prompt is empty", param="messages")
        n, max_new = len(prompt.input_ids), self._max_new(request)
        if n + max_new > self.max_context:
            raise RequestError(f"prompt (after media placeholders) of {n} tokens + max_new_tokens {max_new} = "
                               f"{n + max_new} exceeds the model's context of {self.max_context} tokens",
                               param="messages")
        return prompt

    def submit(self, request: Request, prompt: ThinkerPrompt | None = None) -> RequestHandle:
        """Queue a request (validated first); QueueFull when `max_queue` requests are already waiting."""
        prompt = prompt or self.prepare(request)
        handle = RequestHandle(request)
        job = _Job(handle, prompt, self._max_new(request), request.sampling or self.sampling(),
                   t_submit=time.monotonic())
        with self._lock:
            if len(self._waiting) >= self.max_queue:
                raise QueueFull(f"the engine's queue is full ({self.max_queue} requests waiting)")
            self._waiting.append(job)
            self.counters["requests_submitted"] += 1
            self._lock.notify_all()
        return handle

    def submit_talker(self, tp, *, sampling: SamplingParams | None = None, max_new_tokens: int = 4096,
                      stream_audio: bool = True, wave=None) -> RequestHandle:
        """Run only the speech stage on a talker prompt built in advance (omni_jax.speech.TalkerPrompt with
        `trailing_ids`, e.g. from SpeechGenerator.talker_prompts for the reference's batched semantics). Events:
        AudioChunks (when stream_audio) and Finished with the codes."""
        if self.speech is None:
            raise RequestError("this model is served without speech output", param="modalities")
        if tp.trailing_ids is None:
            raise RequestError("the talker prompt has no trailing_ids (build it with SpeechGenerator.talker_prompt "
                               "/ talker_prompts)")
        if max_new_tokens < 2:
            raise RequestError(f"talker max_new_tokens must be >= 2 (N sampled codes give at most N-1 frames), "
                               f"got {max_new_tokens}", param="talker_max_new_tokens")
        handle = RequestHandle(Request([], speech=True, talker_max_new_tokens=max_new_tokens))
        job = _Job(handle, ThinkerPrompt([], np.zeros((3, 0), np.float32), 0.0), 0, SamplingParams(),
                   state="talking", finish_reason="stop", t_submit=time.monotonic())
        self.speech.submit_prompt(job, tp, sampling or talker_sampling_default(), max_new_tokens, stream_audio, wave)
        with self._lock:
            self._jobs.append(job)
            self._lock.notify_all()
        return handle

    def stats(self) -> dict:
        """Queue depth, running requests and counters (for /metrics)."""
        with self._lock:
            return dict(waiting=len(self._waiting), running=len(self._jobs), max_slots=self.max_slots,
                        max_queue=self.max_queue, compilations=self.compilations, **self.counters)

    def start(self) -> Engine:
        """Run the loop in a background thread."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._serve, name="omni-jax-engine", daemon=True)
            self._thread.start()
        return self

    def shutdown(self, timeout: float | None = 30.0):
        """Stop the loop thread; requests still queued or running end with Finished("cancelled")."""
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._loop_lock:
            for job in list(self._waiting) + list(self._jobs):
                self._finish(job, "cancelled")
            self._waiting.clear()

    def run(self, request: Request, prompt: ThinkerPrompt | None = None) -> list:
        """Submit one request and return all its events (drives the loop inline when no thread runs)."""
        return self.drive([self.submit(request, prompt)])[0]

    def drive(self, handles: list[RequestHandle]) -> list[list]:
        """Wait for requests already submitted (running the loop inline when no thread runs): their events."""
        if self._thread is None:
            while not all(h.done for h in handles):
                self.step()
        return [list(h.events()) for h in handles]

    # -- the loop --------------------------------------------------------------------------------------------
    def _serve(self):
        while True:
            with self._lock:
                while not self._stop and not self._waiting and not self._jobs:
                    self._lock.wait()
                if self._stop:
                    return
            self.step()

    def step(self):
        """One loop turn: cancellations, admission, one prefill chunk, one decode chunk, the speech stage."""
        with self._loop_lock:
            for job in list(self._jobs) + list(self._waiting):
                if job.handle.cancelled:
                    self._finish(job, "cancelled")
            self._admit()
            pre = next((j for j in self._jobs if j.state == "prefill"), None)
            if pre is not None:
                self._guard(pre, self._prefill_chunk, pre)
            if any(j.state == "running" for j in self._jobs):
                self._decode()
            if self.speech is not None:
                self.speech.step([j for j in self._jobs if j.talk is not None])

    def _guard(self, job, fn, *args):
        try:
            fn(*args)
        except Exception as e:  # noqa: BLE001 -- one request's failure must not stop the others
            detail = str(e) if isinstance(e, OmniJaxError) else f"{type(e).__name__}: {e}"
            if not isinstance(e, OmniJaxError):
                traceback.print_exc()
            self._finish(job, "error", error=detail)

    def _admit(self):
        while True:
            with self._lock:
                if not self._free or not self._waiting:
                    return
                job = self._waiting.popleft()
                job.slot = self._free.pop(0)
                job.state = "prefill"
                self._jobs.append(job)
            self._guard(job, self._start, job)

    def _start(self, job: _Job):
        p = job.prompt
        if p.has_media:
            job.embeds, job.deepstack = self.thinker.media_embeds(p.input_ids, audio=p.audio, image=p.image,
                                                                  video=p.video)
        job.chunks = split_chunks(len(p.input_ids), self.thinker.prefill_chunk)

    def _prefill_chunk(self, job: _Job):
        p = job.prompt
        start, valid, t = job.chunks[job.next_chunk]
        ids = np.zeros(t, np.int32)
        ids[:valid] = p.input_ids[start:start + valid]
        pos = np.zeros((3, t), np.float32)
        pos[:, :valid] = p.positions[:, start:start + valid]
        pos[:, valid:] = pos[:, valid - 1:valid] + 1 + np.arange(t - valid)  # padding: overwritten before it is seen

        def piece(x):
            out = np.zeros((t, x.shape[-1]), np.float32)
            out[:valid] = x[start:start + valid]
            return out

        logits, hidden = self.thinker.prefill(job.slot, start, pos, ids=ids,
                                              embeds=None if job.embeds is None else piece(job.embeds),
                                              deepstack=None if job.deepstack is None else
                                              [piece(d) for d in job.deepstack], last=valid - 1)
        if self.speech is not None and (job.request.speech or job.request.return_hidden):
            for i, h in hidden.items():
                job.prompt_hidden.setdefault(i, []).append(np.asarray(h)[:valid])
        job.next_chunk += 1
        if job.next_chunk < len(job.chunks):
            return
        job.prompt_hidden = {i: np.concatenate(v) for i, v in job.prompt_hidden.items()}
        s = job.sampling
        seen = None
        if s.repetition_penalty != 1.0:
            seen = np.zeros(self.thinker.vocab, bool)
            seen[np.asarray(p.input_ids)] = True
        tok = self.thinker.first_token(logits, s, s.seed, seen)
        self.counters["prompt_tokens"] += len(p.input_ids)
        job.state = "running"
        done = self._take_tokens(job, [tok])
        if not done:
            if seen is not None:
                seen[tok] = True
            self.thinker.insert(job.slot, tok=tok, idx=len(p.input_ids), delta=p.delta, remaining=job.max_new - 1,
                                seed=s.seed, count=1, sampling=s, seen=seen)

    def _decode(self):
        toks, emitted, _ = self.thinker.decode()
        for job in [j for j in self._jobs if j.state == "running"]:
            row = toks[job.slot][emitted[job.slot]].tolist()
            if row:
                self._guard(job, self._take_tokens, job, row)

    def _take_tokens(self, job: _Job, new: list[int]) -> bool:
        """Record new thinker tokens, stream their text, detect the end. True when the thinker part ended."""
        self.counters["generation_tokens"] += len(new)
        for tok in new:
            job.tokens.append(int(tok))
            if tok in self.stop_ids:
                job.finish_reason = "stop"
                break
            if len(job.tokens) >= job.max_new:
                job.finish_reason = "length"
                break
        text_ids = [t for t in job.tokens if t not in self.stop_ids]
        text = self.tokenizer.decode(text_ids, skip_special_tokens=True)
        stop_at = min((i for i in (text.find(s) for s in job.request.stop if s) if i >= 0), default=-1)
        if stop_at >= 0:
            text, job.finish_reason = text[:stop_at], "stop"
        elif job.finish_reason is None:
            hold = max((len(s) - 1 for s in job.request.stop), default=0)  # a stop string may still complete
            text = text[:len(text) - hold] if hold else text
            if text.endswith("\ufffd"):
                text = text[:-1]  # an incomplete UTF-8 sequence: wait for its next token
        if len(text) > len(job.text) or new:
            job.handle.put(TextDelta([t for t in new if t not in self.stop_ids], text[len(job.text):]))
            job.text = text
        if self.speech is not None and job.request.speech:
            self.speech.on_thinker_tokens(job)
        if job.finish_reason is None:
            return False
        self._thinker_done(job)
        return True

    def _thinker_done(self, job: _Job):
        if job.state == "running" and job.slot is not None:
            self.thinker.deactivate(job.slot)
        self._release_thinker_slot(job)
        if job.talk is not None or (self.speech is not None and job.request.speech):
            job.state = "talking"
            self.speech.on_thinker_done(job)
        else:
            self._finish(job, job.finish_reason)

    def _release_thinker_slot(self, job: _Job):
        if job.slot is not None:
            with self._lock:
                self._free.append(job.slot)
                self._free.sort()
            job.slot = None

    def _finish(self, job: _Job, reason: str, error: str | None = None):
        """End a request: free its slots in every stage and send Finished."""
        if job.state == "done":
            return
        if job.state in ("prefill", "running") and job.slot is not None:
            self.thinker.deactivate(job.slot)
        self._release_thinker_slot(job)
        extra = {}
        if self.speech is not None and job.talk is not None:
            extra = self.speech.release(job)
        job.state = "done"
        with self._lock:
            if job in self._jobs:
                self._jobs.remove(job)
            if job in self._waiting:
                self._waiting.remove(job)
            self._lock.notify_all()
        self.counters[f"finished_{reason}"] += 1
        completion = len(job.tokens)
        hidden = job.prompt_hidden if job.request.return_hidden and reason in ("stop", "length") else None
        job.handle.put(Finished(reason, prompt_tokens=len(job.prompt.input_ids), completion_tokens=completion,
                                prompt_tokens_details=prompt_token_details(job.prompt, self.cfg), error=error,
                                prompt_ids=list(job.prompt.input_ids), token_ids=list(job.tokens), text=job.text,
                                hidden=hidden, **extra))

    def _max_new(self, request: Request) -> int:
        return request.max_new_tokens or self.defaults.max_new_tokens


__all__ = ["Engine", "Request", "RequestHandle", "TextDelta", "AudioChunk", "Finished", "RequestError", "QueueFull"]

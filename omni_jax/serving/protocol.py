"""What the serving engine and its clients (HTTP server, `omni-jax generate`, OmniSession) exchange.

The engine (omni_jax/serving/engine.py) owns the model, the slot KV caches and the compiled steps; clients only
`submit` a `Request` and read `Event`s from the returned `RequestHandle`. This module has no JAX in it, so the
server and tests can import it cheaply.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Iterator
from typing import Literal

import numpy as np

from omni_jax.errors import OmniJaxError


class RequestError(OmniJaxError):
    """A request that cannot be served (HTTP 400): `param` names the offending field where known."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class QueueFull(OmniJaxError):
    """The engine's waiting queue is full (HTTP 503 with Retry-After)."""


@dataclasses.dataclass
class Request:
    """One conversation to answer. `messages`: parsed turns (omni_jax.processing.chat.parse_messages output).
    `sampling`: thinker sampling (omni_jax.sampling.SamplingParams; None = the model's generation defaults).
    With `speech`, the reply is also spoken with `speaker`; the talker samples with `talker_sampling`
    (None = transformers' defaults) for at most `talker_max_new_tokens` codec tokens."""

    messages: list
    max_new_tokens: int | None = None
    sampling: object | None = None
    stop: tuple[str, ...] = ()
    use_audio_in_video: bool = False
    speech: bool = False
    speaker: str = "Ethan"
    talker_max_new_tokens: int = 4096
    talker_sampling: object | None = None
    request_id: str = ""
    stream_audio: bool = True  # send AudioChunks (False: only Finished.codes, e.g. for an offline waveform)
    return_hidden: bool = False  # Finished.hidden gets the prompt's thinker hidden states (speech engines only)


@dataclasses.dataclass
class TextDelta:
    """New thinker tokens (stop token excluded) and the text they add (detokenized incrementally)."""

    token_ids: list[int]
    text: str


@dataclasses.dataclass
class AudioChunk:
    """Float32 24 kHz mono samples; the chunks of one request concatenate to its whole waveform."""

    samples: np.ndarray
    num_codec_frames: int


@dataclasses.dataclass
class Finished:
    """The last event of every request. finish_reason: "stop" (stop token / stop string), "length"
    (max_new_tokens), "cancelled" or "error" (then `error` says why)."""

    finish_reason: Literal["stop", "length", "cancelled", "error"]
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_tokens_details: dict = dataclasses.field(default_factory=dict)  # text_tokens / audio_tokens / image_tokens
    num_codec_frames: int = 0
    audio_seconds: float = 0.0
    error: str | None = None
    prompt_ids: list[int] = dataclasses.field(default_factory=list)  # the prompt (media placeholders expanded)
    token_ids: list[int] = dataclasses.field(default_factory=list)  # every generated id, a final stop id included
    text: str = ""  # the whole reply text (what the TextDeltas added up to)
    codes: np.ndarray | None = None  # speech: int32 [G, T] codec frames
    codec_tokens: list[int] = dataclasses.field(default_factory=list)  # speech: every sampled codebook-0 id
    codec_finished: bool = False  # speech: the talker sampled codec EOS
    hidden: dict | None = None  # return_hidden: {0: input embeddings, accept_hidden_layer: ...} float [L, H]


Event = TextDelta | AudioChunk | Finished


class RequestHandle:
    """The client's side of one request: iterate `events()` (blocking, thread-safe producer), `cancel()` at any
    time (the engine frees the request's slots in every stage and ends the stream with Finished("cancelled"))."""

    def __init__(self, request: Request):
        self.request = request
        self._events: queue.Queue = queue.Queue()
        self._cancelled = threading.Event()
        self._done = threading.Event()

    # engine side
    def put(self, event: Event) -> None:
        self._events.put(event)
        if isinstance(event, Finished):
            self._done.set()

    @property
    def done(self) -> bool:
        """The engine has sent Finished (the client may not have read it yet)."""
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    # client side
    def cancel(self) -> None:
        self._cancelled.set()

    def get(self, timeout: float | None = None) -> Event:
        """The next event (raises queue.Empty after `timeout` seconds)."""
        return self._events.get(timeout=timeout)

    def events(self) -> Iterator[Event]:
        while True:
            ev = self._events.get()
            yield ev
            if isinstance(ev, Finished):
                return

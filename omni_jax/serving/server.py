"""The OpenAI-compatible HTTP server: FastAPI routes over the serving engine, run by uvicorn (`omni-jax serve`).

Routes: POST /v1/chat/completions (JSON reply or a text/event-stream), GET /v1/models, GET /health (503 until the
engine is loaded and warm), GET /metrics (Prometheus text), GET / (static/index.html: a page to ask by text or
microphone and hear the streamed reply). The handlers only translate: a request body becomes an
engine `Request` (omni_jax.serving.openai_api), the engine's events become reply JSON or SSE chunks. The engine is
loaded and warmed in a background thread so the port answers /health at once.

A client that goes away cancels its request (`RequestHandle.cancel()`), which frees its slots in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse

from omni_jax.errors import OmniJaxError
from omni_jax.serving import openai_api as api
from omni_jax.serving.metrics import ServerMetrics
from omni_jax.serving.protocol import AudioChunk, Finished, QueueFull, RequestError, TextDelta

log = logging.getLogger("omni_jax.serve")
RETRY_AFTER_S = "1"
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static", "index.html")


def model_info(engine) -> api.ModelInfo:
    """Validation facts from an engine: its name, voices (None without speech) and generation defaults."""
    speakers = engine.cfg.talker_config.speakers if engine.speech is not None else None
    return api.ModelInfo(engine.model_name, api.valid_speakers(speakers), engine.defaults)


def _stat(stats: dict, key: str) -> int:
    return int(stats.get(key) or 0)


class ServerState:
    """The engine (None until loaded), readiness and metrics of one app."""

    def __init__(self, load: Callable[[], object], on_load_error: Callable[[BaseException], None] | None = None):
        self.load = load
        self.on_load_error = on_load_error
        self.engine = None
        self.info: api.ModelInfo | None = None
        self.ready = False
        self.load_error: str | None = None
        self.metrics = ServerMetrics()
        self.started = int(time.time())

    def load_engine(self) -> None:
        try:
            engine = self.load()
            engine.warmup()
            engine.start()
            self.info = model_info(engine)
            self.engine = engine
            self.ready = True
            log.warning("omni-jax serve: %s is loaded and warm", self.info.name)
        except BaseException as e:  # noqa: BLE001 - reported, and the process told to stop
            self.load_error = f"{type(e).__name__}: {e}"
            log.error("omni-jax serve: loading the model failed: %s", self.load_error)
            if self.on_load_error is not None:
                self.on_load_error(e)


def _json_error(status: int, message: str, param: str | None = None, headers: dict | None = None):
    return JSONResponse(api.error_body(status, message, param), status_code=status, headers=headers)


class _Progress:
    """Per-request timing and output, fed with engine events (for the reply, usage and metrics)."""

    def __init__(self, t0: float):
        self.t0 = t0
        self.first_text = self.last_text = self.first_audio = None
        self.tokens = 0
        self.text: list[str] = []
        self.pcm: list[bytes] = []

    def see(self, ev) -> None:
        now = time.perf_counter()
        if isinstance(ev, TextDelta) and ev.token_ids:
            self.first_text = self.first_text or now
            self.last_text = now
            self.tokens += len(ev.token_ids)
        if isinstance(ev, TextDelta):
            self.text.append(ev.text)
        elif isinstance(ev, AudioChunk) and len(ev.samples):
            self.first_audio = self.first_audio or now

    def record(self, metrics: ServerMetrics, fin: Finished) -> None:
        ttft = None if self.first_text is None else self.first_text - self.t0
        tpot = None
        if self.first_text is not None and self.tokens > 1:
            tpot = (self.last_text - self.first_text) / (self.tokens - 1)
        ttfp = None if self.first_audio is None else self.first_audio - self.t0
        metrics.request_done(finish_reason=fin.finish_reason, prompt_tokens=fin.prompt_tokens,
                             completion_tokens=fin.completion_tokens, audio_seconds=fin.audio_seconds, ttft=ttft,
                             tpot=tpot, ttfp=ttfp, e2e=time.perf_counter() - self.t0)


def _bridge(handle, loop: asyncio.AbstractEventLoop) -> asyncio.Queue:
    """An asyncio queue fed with the handle's events by a reader thread (the handle's queue blocks)."""
    q: asyncio.Queue = asyncio.Queue()

    def pump():
        for ev in handle.events():
            try:
                loop.call_soon_threadsafe(q.put_nowait, ev)
            except RuntimeError:  # the event loop is closed (server shutting down)
                handle.cancel()
                return

    threading.Thread(target=pump, name="omni-jax-events", daemon=True).start()
    return q


def create_app(load: Callable[[], object], *, on_load_error: Callable[[BaseException], None] | None = None):
    """The FastAPI app. `load()` returns an engine (omni_jax.serving.scheduler.Engine, not yet started); it runs in
    a background thread at start-up, followed by engine.warmup() and engine.start()."""
    state = ServerState(load, on_load_error)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        thread = threading.Thread(target=state.load_engine, name="omni-jax-load", daemon=True)
        thread.start()
        try:
            yield
        finally:
            if state.engine is not None:
                await asyncio.to_thread(state.engine.shutdown)

    app = FastAPI(title="omni_jax", lifespan=lifespan)
    app.state.omni = state

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc):  # FastAPI's 422 -> OpenAI-style 400
        errs = exc.errors()
        first = errs[0] if errs else {}
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return _json_error(400, f"invalid request: {first.get('msg', 'validation error')}", param)

    @app.exception_handler(404)
    async def _not_found(request, exc):
        return _json_error(404, f"no route {request.method} {request.url.path}")

    @app.exception_handler(405)
    async def _bad_method(request, exc):
        return _json_error(405, f"method {request.method} is not allowed on {request.url.path}")

    @app.get("/")
    async def page():  # a page to try the model in a browser
        with open(PAGE, encoding="utf-8") as f:
            return HTMLResponse(f.read())

    @app.get("/health")
    async def health():
        if state.ready:
            return JSONResponse({"status": "ok"})
        msg = f"loading the model failed: {state.load_error}" if state.load_error else "the model is loading"
        return _json_error(503, msg, headers={"Retry-After": RETRY_AFTER_S})

    @app.get("/v1/models")
    async def models():
        if not state.ready:
            return _json_error(503, "the model is loading", headers={"Retry-After": RETRY_AFTER_S})
        return JSONResponse(api.models_list(state.info.name, state.started))

    @app.get("/metrics")
    async def metrics():
        eng = state.engine
        stats = eng.stats() if eng is not None else {}
        text = state.metrics.render(queue_depth=_stat(stats, "waiting"), running=_stat(stats, "running"),
                                    compilations=getattr(eng, "compilations", None), ready=state.ready)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.perf_counter()
        if not state.ready:
            return _json_error(503, "the model is loading", headers={"Retry-After": RETRY_AFTER_S})
        workdir = tempfile.mkdtemp(prefix="omni_jax_req_")  # inline media, read by engine.submit
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise api.bad(f"malformed JSON body: {e}") from e
            parsed = api.parse_chat_request(body, state.info, workdir)
            try:
                handle = await asyncio.to_thread(state.engine.submit, parsed.request)
            except QueueFull as e:
                state.metrics.request_rejected(503)
                return _json_error(503, f"the server is busy: {e}", headers={"Retry-After": RETRY_AFTER_S})
            except RequestError as e:
                raise api.bad(parsed.describe(str(e)), e.param) from e
            except OmniJaxError as e:
                raise api.bad(parsed.describe(str(e))) from e
        except api.ApiError as e:
            state.metrics.request_rejected(e.status)
            return JSONResponse(e.body(), status_code=e.status)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)  # submit has loaded the media into the prompt
        events = _bridge(handle, asyncio.get_running_loop())
        if parsed.stream:
            stream = _stream(state, parsed, handle, events, t0)
            # A client gone before the stream starts never runs the generator's finally: cancel on collection
            # (a no-op for a finished request).
            weakref.finalize(stream, handle.cancel)
            return StreamingResponse(stream, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(state, request, parsed, handle, events, t0)

    return app


async def _complete(state: ServerState, request, parsed: api.ChatRequest, handle, events: asyncio.Queue, t0: float):
    """Collect a whole reply; a client that disconnects meanwhile cancels the request."""

    prog = _Progress(t0)
    while True:
        try:
            ev = await asyncio.wait_for(events.get(), timeout=0.25)
        except TimeoutError:
            if await request.is_disconnected():
                handle.cancel()
            continue
        prog.see(ev)
        if isinstance(ev, AudioChunk):
            prog.pcm.append(api.to_pcm16(ev.samples))
        if isinstance(ev, Finished):
            break
    prog.record(state.metrics, ev)
    if ev.finish_reason == "error":
        return JSONResponse(api.error_body(500, f"generation failed: {ev.error}"), status_code=500)
    if ev.finish_reason == "cancelled":
        return JSONResponse(api.error_body(408, "the request was cancelled"), status_code=408)
    req = parsed.request
    wav = api.wav_bytes(b"".join(prog.pcm)) if req.speech else None
    return JSONResponse(api.completion(req.request_id, int(time.time()), state.info.name, "".join(prog.text), ev, wav))


def _sse(obj) -> bytes:
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n".encode()


async def _stream(state: ServerState, parsed: api.ChatRequest, handle, events: asyncio.Queue, t0: float):
    """SSE chunks: role, text / audio deltas, finish, usage (when asked), [DONE]. If the client goes away the
    generator is closed (GeneratorExit / CancelledError) and the request is cancelled."""
    req = parsed.request
    rid, created, model = req.request_id, int(time.time()), state.info.name
    prog = _Progress(t0)
    fin = None
    try:
        yield _sse(api.chunk(rid, created, model, {"role": "assistant", "content": ""}))
        while True:
            ev = await events.get()
            prog.see(ev)
            if isinstance(ev, TextDelta) and ev.text:
                yield _sse(api.chunk(rid, created, model, {"content": ev.text}, modality="text"))
            elif isinstance(ev, AudioChunk) and len(ev.samples):
                pcm = api.to_pcm16(ev.samples)
                data = pcm if parsed.audio_format == "pcm16" else api.wav_bytes(pcm)
                yield _sse(api.chunk(rid, created, model, api.audio_delta(rid, data, ""), modality="audio"))
            elif isinstance(ev, Finished):
                fin = ev
                break
        prog.record(state.metrics, fin)
        if fin.finish_reason in ("error", "cancelled"):
            yield _sse(api.error_body(500, f"generation failed: {fin.error or fin.finish_reason}"))
        else:
            yield _sse(api.chunk(rid, created, model, {}, fin.finish_reason))
            if parsed.include_usage:
                yield _sse(api.usage_chunk(rid, created, model, fin, req.speech))
        yield b"data: [DONE]\n\n"
    finally:
        if fin is None:
            handle.cancel()


def serve(load: Callable[[], object], *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> int:
    """Run the server until interrupted; returns the exit status (1 when the model failed to load)."""
    import uvicorn

    failed: list[BaseException] = []
    server: uvicorn.Server | None = None

    def on_load_error(e: BaseException) -> None:
        failed.append(e)
        if server is not None:
            server.should_exit = True

    app = create_app(load, on_load_error=on_load_error)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on"))
    print(f"omni-jax serve: listening on http://{host}:{port} (GET /health turns 200 once the model is warm)",
          file=sys.stderr, flush=True)
    server.run()
    if failed:
        e = failed[0]
        print(f"omni-jax serve: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, OmniJaxError) else 1
    return 0

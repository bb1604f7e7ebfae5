"""OpenAI Chat Completions shapes: request parsing into an engine `Request`, and the reply / stream / error bodies.

No HTTP here (omni_jax/serving/server.py does that) and no JAX: everything is plain dicts, so the shapes can be
tested directly. The shapes follow OpenAI's audio chat completions with vLLM-Omni's extensions (audio_url /
video_url parts, a top-level `speaker`, `mm_processor_kwargs.use_audio_in_video`, `talker_max_new_tokens`).

Media sent inline (base64 `input_audio`, `data:` URLs) is decoded into a per-request directory (`workdir`), so the
engine sees ordinary file paths, as `omni_jax.processing.chat.parse_messages` expects; the server deletes the
directory when the request ends.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import io
import math
import os
import time
import uuid
import wave
from collections.abc import Sequence
from urllib.parse import unquote, urlparse

import numpy as np

from omni_jax.processing.chat import MessagesError, parse_messages
from omni_jax.serving.protocol import Finished, Request

SAMPLE_RATE = 24_000  # Code2Wav's output rate (omni_jax.speech.SAMPLE_RATE; not imported to keep JAX out)
INPUT_AUDIO_FORMATS = ("wav", "mp3", "flac")
OUTPUT_AUDIO_FORMATS = ("wav", "pcm16")
AUDIO_MIME = {"audio/wav": "wav", "audio/x-wav": "wav", "audio/wave": "wav", "audio/vnd.wave": "wav",
              "audio/mpeg": "mp3", "audio/mp3": "mp3", "audio/flac": "flac", "audio/x-flac": "flac"}
IMAGE_MIME = {"image/png": "png", "image/jpeg": "jpg", "image/jpg": "jpg", "image/webp": "webp", "image/gif": "gif",
              "image/bmp": "bmp"}
VIDEO_MIME = {"video/mp4": "mp4", "video/webm": "webm", "video/quicktime": "mov", "video/x-matroska": "mkv",
              "video/x-msvideo": "avi"}
ROLE_ALIASES = {"developer": "system"}
AUDIO_EXPIRY_S = 3600
ERROR_TYPES = {400: "BadRequestError", 404: "NotFoundError", 408: "RequestTimeoutError",
               500: "InternalServerError", 503: "ServiceUnavailableError"}


class ApiError(Exception):
    """An HTTP error with an OpenAI-shaped body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param)


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "APIError"), "param": param,
                      "code": status}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


# ---------------------------------------------------------------------------------------------------------------
# Request parsing


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What request validation needs to know about the served model. speakers: lower-case voice names, or None
    when the model has no speech output. defaults: omni_jax.inference.GenerationDefaults (its `sampling()` builds
    SamplingParams from the request's values)."""

    name: str
    speakers: tuple[str, ...] | None
    defaults: object


@dataclasses.dataclass
class ChatRequest:
    """A parsed request: the engine `Request` plus how to shape the reply."""

    request: Request
    stream: bool = False
    include_usage: bool = False
    audio_format: str | None = None  # "wav" / "pcm16" when speech is asked for
    media_params: dict = dataclasses.field(default_factory=dict)  # inline media file -> the field it came from

    def describe(self, message: str) -> str:
        """An engine error about an inline media file names the request field instead of the server's temporary
        file (e.g. "the audio in 'messages[0].content[0].input_audio.data' is 16.50 s long ...")."""
        for path, param in self.media_params.items():
            message = message.replace(f"file {path!r}", f"in {param!r}").replace(repr(path), repr(param))
        return message


def _typed(body: dict, key: str, types, what: str, where: str | None = None):
    v = body.get(key)
    if v is None:
        return None
    if isinstance(v, bool) and bool not in types or not isinstance(v, types):
        raise bad(f"'{where or key}' must be {what}, got {type(v).__name__}", where or key)
    if isinstance(v, float) and not math.isfinite(v):
        raise bad(f"'{where or key}' must be a finite number", where or key)
    return v


def _decode_b64(data, param: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise bad(f"'{param}' must be a non-empty base64 string", param)
    try:
        raw = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as e:
        raise bad(f"'{param}' is not valid base64 ({e})", param) from e
    if not raw:
        raise bad(f"'{param}' decodes to no bytes", param)
    return raw


def _check_audio_bytes(raw: bytes, fmt: str, param: str) -> None:
    """Reject audio whose header does not decode as `fmt` before the request reaches the engine."""
    import soundfile as sf

    try:
        info = sf.info(io.BytesIO(raw))
    except Exception as e:
        raise bad(f"{param}: cannot decode the audio as {fmt}: {e}", param) from e
    if info.frames <= 0 or info.samplerate <= 0:
        raise bad(f"{param}: the {fmt} audio holds no samples", param)


def _check_image_bytes(raw: bytes, param: str) -> None:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.verify()
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise bad(f"{param}: cannot decode the image: {e}", param) from e


class _MediaWriter:
    """Writes decoded media into the request's directory and returns the file paths."""

    def __init__(self, workdir: str | None):
        self.workdir = workdir
        self.params: dict[str, str] = {}  # file written -> the request field it came from

    def write(self, raw: bytes, ext: str, param: str) -> str:
        if self.workdir is None:
            raise bad("inline media is not accepted here (no request directory)")
        path = os.path.join(self.workdir, f"media{len(self.params) + 1}.{ext}")
        with open(path, "wb") as f:
            f.write(raw)
        self.params[path] = param
        return path

    def url(self, url, kind: str, mimes: dict[str, str], param: str) -> str:
        """A data: URL (decoded and written) or a local path / file:// URL (must exist) -> a file path."""
        if not isinstance(url, str) or not url:
            raise bad(f"'{param}' must be a non-empty string", param)
        if url.startswith("data:"):
            head, sep, payload = url[5:].partition(",")
            if not sep or not head.endswith(";base64"):
                raise bad(f"'{param}': a data URL must look like data:<mime>;base64,<data>", param)
            mime = head[: -len(";base64")].split(";")[0].strip().lower()
            if mime not in mimes:
                raise bad(f"'{param}': unsupported {kind} type {mime!r}; supported: {', '.join(sorted(mimes))}",
                          param)
            raw = _decode_b64(payload, param)
            if kind == "audio":
                _check_audio_bytes(raw, mimes[mime], param)
            elif kind == "image":
                _check_image_bytes(raw, param)
            return self.write(raw, mimes[mime], param)
        parsed = urlparse(url)
        if parsed.scheme in ("http", "https"):
            raise bad(f"'{param}': remote URLs are not fetched; send a data: URL or a local path", param)
        if parsed.scheme == "file":
            path = unquote(parsed.path)
        elif parsed.scheme in ("", ) or len(parsed.scheme) == 1:  # plain path (or a Windows drive letter)
            path = url
        else:
            raise bad(f"'{param}': unsupported URL scheme {parsed.scheme!r}", param)
        path = os.path.abspath(os.path.expanduser(path))
        if not os.path.isfile(path):
            raise bad(f"'{param}': {kind} file not found: {path}", param)
        return path


def _parse_part(part, param: str, media: _MediaWriter) -> dict:
    if not isinstance(part, dict):
        raise bad(f"'{param}' must be an object, got {type(part).__name__}", param)
    ptype = part.get("type")
    if ptype == "text":
        if not isinstance(part.get("text"), str):
            raise bad(f"'{param}.text' must be a string", f"{param}.text")
        return {"type": "text", "text": part["text"]}
    if ptype == "input_audio":
        ia = part.get("input_audio")
        if not isinstance(ia, dict):
            raise bad(f"'{param}.input_audio' must be an object with 'data' and 'format'", f"{param}.input_audio")
        fmt = ia.get("format")
        if fmt not in INPUT_AUDIO_FORMATS:
            raise bad(f"'{param}.input_audio.format': unsupported audio format {fmt!r}; supported: "
                      f"{', '.join(INPUT_AUDIO_FORMATS)}", f"{param}.input_audio.format")
        raw = _decode_b64(ia.get("data"), f"{param}.input_audio.data")
        _check_audio_bytes(raw, fmt, f"{param}.input_audio.data")
        return {"type": "audio", "path": media.write(raw, fmt, f"{param}.input_audio.data")}
    for kind, mimes in (("audio", AUDIO_MIME), ("image", IMAGE_MIME), ("video", VIDEO_MIME)):
        if ptype == f"{kind}_url":
            obj = part.get(ptype)
            url = obj.get("url") if isinstance(obj, dict) else obj  # {"url": ...} or a bare string
            return {"type": kind, "path": media.url(url, kind, mimes, f"{param}.{ptype}.url")}
    raise bad(f"'{param}.type': unsupported content part type {ptype!r}; supported: text, input_audio, image_url, "
              "audio_url, video_url", f"{param}.type")


def _parse_messages(msgs, media: _MediaWriter) -> list:
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list", "messages")
    turns = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(f"'{where}' must be an object with 'role' and 'content'", where)
        role = ROLE_ALIASES.get(m.get("role"), m.get("role"))
        if role not in ("system", "user", "assistant"):
            raise bad(f"'{where}.role': unsupported role {m.get('role')!r}; expected system, developer, user or "
                      "assistant", f"{where}.role")
        content = m.get("content")
        if content is None:
            content = ""  # e.g. an assistant turn that carried only audio
        if isinstance(content, list):
            content = [_parse_part(p, f"{where}.content[{j}]", media) for j, p in enumerate(content)]
        elif not isinstance(content, str):
            raise bad(f"'{where}.content' must be a string or a list of parts", f"{where}.content")
        turns.append({"role": role, "content": content})
    try:
        return parse_messages(turns, media.workdir or ".")
    except MessagesError as e:
        raise bad(str(e), "messages") from e


def _sampling(body: dict, defaults):
    """(thinker SamplingParams or None for the model's defaults, talker SamplingParams or None).
    defaults: omni_jax.inference.GenerationDefaults."""
    from omni_jax.sampling import SamplingError

    temperature = _typed(body, "temperature", (int, float), "a number")
    top_p = _typed(body, "top_p", (int, float), "a number")
    top_k = _typed(body, "top_k", (int,), "an integer")
    seed = _typed(body, "seed", (int,), "an integer")
    if temperature is not None and not 0 <= temperature <= 2:
        raise bad(f"'temperature' must be in [0, 2], got {temperature}", "temperature")
    if top_p is not None and not 0 < top_p <= 1:
        raise bad(f"'top_p' must be in (0, 1], got {top_p}", "top_p")
    if top_k is not None and top_k < -1:
        raise bad(f"'top_k' must be -1 (off), 0 (off) or positive, got {top_k}", "top_k")
    if temperature is None and top_p is None and top_k is None and seed is None:
        return None, None
    from omni_jax.speech import talker_sampling

    greedy = temperature == 0
    try:
        params = defaults.sampling(greedy=True if greedy else None, temperature=float(temperature) if temperature
                                   else None, top_k=None if top_k is None else max(top_k, 0),
                                   top_p=None if top_p is None else float(top_p), seed=int(seed or 0))
    except SamplingError as e:
        raise bad(str(e)) from e
    # temperature 0 makes the whole reply deterministic (talker and code predictor greedy too), as
    # `omni-jax generate --greedy`; otherwise the talker samples with transformers' defaults and the seed.
    return params, talker_sampling(greedy=greedy, seed=int(seed or 0))


def parse_chat_request(body, info: ModelInfo, workdir: str | None = None) -> ChatRequest:
    """Validate a decoded JSON body; raise ApiError (400 / 404) naming the offending field. Media sent inline is
    written into `workdir`."""
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    model = _typed(body, "model", (str,), "a string")
    if model is not None and model != info.name:
        raise ApiError(404, f"the model {model!r} does not exist; this server serves {info.name!r}", "model")
    stream = bool(_typed(body, "stream", (bool,), "a boolean"))
    opts = _typed(body, "stream_options", (dict,), "an object") or {}
    include_usage = bool(_typed(opts, "include_usage", (bool,), "a boolean", "stream_options.include_usage"))

    max_tokens = _typed(body, "max_completion_tokens", (int,), "an integer")
    key = "max_completion_tokens"
    if max_tokens is None:
        max_tokens, key = _typed(body, "max_tokens", (int,), "an integer"), "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise bad(f"'{key}' must be at least 1, got {max_tokens}", key)
    talker_max = _typed(body, "talker_max_new_tokens", (int,), "an integer")
    if talker_max is not None and talker_max < 1:
        raise bad(f"'talker_max_new_tokens' must be at least 1, got {talker_max}", "talker_max_new_tokens")

    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        stop = tuple(stop)
    else:
        raise bad("'stop' must be a string or a list of strings", "stop")
    if any(not s for s in stop):
        raise bad("'stop' strings must not be empty", "stop")

    modalities = _typed(body, "modalities", (list,), "a list") or ["text"]
    if not modalities or any(m not in ("text", "audio") for m in modalities):
        raise bad(f"'modalities' must be [\"text\"] or [\"text\", \"audio\"], got {modalities!r}", "modalities")
    speech = "audio" in modalities
    audio = _typed(body, "audio", (dict,), "an object") or {}
    audio_format = None
    speaker = _typed(body, "speaker", (str,), "a string") or _typed(audio, "voice", (str,), "a string", "audio.voice")
    if speech:
        if info.speakers is None:
            raise bad("this model has no speech output; ask for modalities [\"text\"]", "modalities")
        audio_format = audio.get("format", "wav")
        if audio_format not in OUTPUT_AUDIO_FORMATS:
            raise bad(f"'audio.format': unsupported output audio format {audio_format!r}; supported: "
                      f"{', '.join(OUTPUT_AUDIO_FORMATS)}", "audio.format")
        speaker = speaker or ("ethan" if "ethan" in info.speakers else info.speakers[0] if info.speakers else "")
        if speaker.lower() not in info.speakers:
            param = "speaker" if body.get("speaker") is not None else "audio.voice"
            raise bad(f"unknown speaker {speaker!r}; valid speakers: {', '.join(sorted(info.speakers))}", param)

    mm = _typed(body, "mm_processor_kwargs", (dict,), "an object") or {}
    use_aiv = bool(_typed(mm, "use_audio_in_video", (bool,), "a boolean", "mm_processor_kwargs.use_audio_in_video"))
    sampling, talker = _sampling(body, info.defaults)
    media = _MediaWriter(workdir)
    messages = _parse_messages(body.get("messages"), media)
    req = Request(messages=messages, max_new_tokens=max_tokens, sampling=sampling, stop=stop,
                  use_audio_in_video=use_aiv, speech=speech, speaker=(speaker or "Ethan"),
                  talker_max_new_tokens=talker_max or 4096, talker_sampling=talker,
                  request_id=f"chatcmpl-{uuid.uuid4().hex}")
    return ChatRequest(req, stream=stream, include_usage=include_usage, audio_format=audio_format,
                       media_params=media.params)


# ---------------------------------------------------------------------------------------------------------------
# Audio encoding


def to_pcm16(samples: np.ndarray) -> bytes:
    """float32 [N] in [-1, 1] -> little-endian int16 bytes (clipped, rounded to nearest)."""
    x = np.clip(np.rint(np.asarray(samples, np.float32) * 32767.0), -32768, 32767)
    return x.astype("<i2").tobytes()


def wav_bytes(pcm16: bytes, sample_rate: int = SAMPLE_RATE) -> bytes:
    """A mono 16-bit WAV file around raw pcm16 bytes."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm16)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# ---------------------------------------------------------------------------------------------------------------
# Replies


def usage(fin: Finished, audio_tokens: int | None = None) -> dict:
    details = {"audio_tokens": 0, "image_tokens": 0, "text_tokens": fin.prompt_tokens}
    details.update(fin.prompt_tokens_details or {})
    completion = {"text_tokens": fin.completion_tokens}
    if audio_tokens is not None:
        completion["audio_tokens"] = audio_tokens
    return {"prompt_tokens": fin.prompt_tokens, "completion_tokens": fin.completion_tokens,
            "total_tokens": fin.prompt_tokens + fin.completion_tokens, "prompt_tokens_details": details,
            "completion_tokens_details": completion}


def completion(rid: str, created: int, model: str, text: str, fin: Finished, audio_wav: bytes | None) -> dict:
    message = {"role": "assistant", "content": text}
    if audio_wav is not None:
        message["audio"] = {"id": f"audio-{rid.removeprefix('chatcmpl-')}", "data": b64(audio_wav),
                            "expires_at": created + AUDIO_EXPIRY_S, "transcript": text}
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "finish_reason": fin.finish_reason, "message": message, "logprobs": None}],
            "usage": usage(fin, fin.num_codec_frames if audio_wav is not None else None)}


def chunk(rid: str, created: int, model: str, delta: dict, finish_reason: str | None = None,
          modality: str | None = None) -> dict:
    out = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
           "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]}
    if modality is not None:
        out["modality"] = modality
    return out


def audio_delta(rid: str, data: bytes, transcript: str) -> dict:
    return {"audio": {"id": f"audio-{rid.removeprefix('chatcmpl-')}", "data": b64(data), "transcript": transcript}}


def usage_chunk(rid: str, created: int, model: str, fin: Finished, speech: bool) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model, "choices": [],
            "usage": usage(fin, fin.num_codec_frames if speech else None)}


def models_list(name: str, created: int | None = None) -> dict:
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created or int(time.time()),
                                        "owned_by": "omni_jax"}]}


def valid_speakers(speakers: Sequence[str] | dict | None) -> tuple[str, ...] | None:
    return None if speakers is None else tuple(sorted(str(s).lower() for s in speakers))

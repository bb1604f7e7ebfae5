"""Chat messages files and prompt building (spec §8.3, §8.4).

A messages file is a JSON list of turns:

    [{"role": "system", "content": "You are a helpful assistant."},
     {"role": "user", "content": [{"type": "audio", "path": "clip.wav"},
                                  {"type": "image", "path": "cat.png"},
                                  {"type": "video", "path": "walk.mp4", "fps": 2.0},
                                  {"type": "text", "text": "What happens here?"}]}]

Roles are system / user / assistant; content is a string or a list of parts. Media paths are relative to the
messages file and are resolved to absolute paths that must exist.

`build_prompt` renders the chat template, tokenizes the text, and expands every `<|audio_pad|>` /
`<|image_pad|>` / `<|video_pad|>` placeholder into as many copies as its encoder produces tokens, in order of
appearance — the token-level equivalent of `Qwen3OmniMoeProcessor`'s text replacement (placeholders are special
tokens, so replacing them before or after tokenization gives the same ids). With `use_audio_in_video` each video
placeholder becomes `<|audio_start|>` + the video's and its audio track's tokens interleaved by time +
`<|audio_end|>` (`audio_in_video_order`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
from collections.abc import Sequence

import numpy as np

from omni_jax.errors import OmniJaxError
from omni_jax.processing.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")
PART_TYPES = ("text", "audio", "image", "video")
MEDIA_TYPES = ("audio", "image", "video")
# Placeholder names as Qwen3OmniMoeProcessor reads them from the tokenizer, with the Qwen strings as fallback.
PLACEHOLDERS = {"audio": ("audio_token", "<|audio_pad|>"), "image": ("image_token", "<|image_pad|>"),
                "video": ("video_token", "<|video_pad|>")}


class MessagesError(OmniJaxError):
    """A messages file (or list) that cannot be turned into a prompt; the message names the offending entry."""


@dataclasses.dataclass(frozen=True)
class ContentPart:
    """One part of a turn: text (`text`), or a media file (`path`, absolute) with video `fps` (None = default)."""

    type: str
    text: str | None = None
    path: str | None = None
    fps: float | None = None

    def to_template(self) -> dict:
        if self.type == "text":
            return {"type": "text", "text": self.text}
        d = {"type": self.type, "path": self.path}
        if self.fps is not None:
            d["fps"] = self.fps
        return d


@dataclasses.dataclass(frozen=True)
class Message:
    role: str
    content: str | tuple[ContentPart, ...]

    def to_template(self) -> dict:
        """The dict a chat template (ours or transformers') sees."""
        if isinstance(self.content, str):
            return {"role": self.role, "content": self.content}
        return {"role": self.role, "content": [p.to_template() for p in self.content]}

    def parts(self, type_: str) -> list[ContentPart]:
        if isinstance(self.content, str):
            return []
        return [p for p in self.content if p.type == type_]


def media_parts(messages: Sequence[Message], type_: str) -> list[ContentPart]:
    """The `type_` ("audio" / "image" / "video") parts of all messages, in prompt order."""
    return [p for m in messages for p in m.parts(type_)]


def _parse_part(part, where: str, base_dir: str) -> ContentPart:
    if not isinstance(part, dict):
        raise MessagesError(f"{where}: a content part must be an object, got {type(part).__name__}")
    ptype = part.get("type")
    if ptype not in PART_TYPES:
        raise MessagesError(f"{where}: unknown content part type {ptype!r}; expected one of {list(PART_TYPES)}")
    if ptype == "text":
        if not isinstance(part.get("text"), str):
            raise MessagesError(f"{where}: a text part needs a string 'text'")
        return ContentPart("text", text=part["text"])
    path = part.get("path")
    if not isinstance(path, str) or not path:
        raise MessagesError(f"{where}: an {ptype} part needs a string 'path'")
    full = os.path.abspath(os.path.join(base_dir, os.path.expanduser(path)))
    if not os.path.isfile(full):
        raise MessagesError(f"{where}: {ptype} file not found: {full}")
    fps = None
    if ptype == "video" and part.get("fps") is not None:
        fps = part["fps"]
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
            raise MessagesError(f"{where}: video 'fps' must be a positive number, got {fps!r}")
        fps = float(fps)
    elif part.get("fps") is not None:
        raise MessagesError(f"{where}: 'fps' is only meaningful for video parts")
    return ContentPart(ptype, path=full, fps=fps)


def parse_messages(data, base_dir: str | os.PathLike = ".") -> list[Message]:
    """Validate a decoded messages list; media paths are resolved against `base_dir`."""
    base_dir = os.fspath(base_dir)
    if not isinstance(data, list):
        raise MessagesError(f"messages must be a JSON list of turns, got {type(data).__name__}")
    if not data:
        raise MessagesError("messages list is empty")
    out = []
    for i, msg in enumerate(data):
        where = f"message {i}"
        if not isinstance(msg, dict):
            raise MessagesError(f"{where}: must be an object with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if role not in ROLES:
            raise MessagesError(f"{where}: unknown role {role!r}; expected one of {list(ROLES)}")
        if "content" not in msg:
            raise MessagesError(f"{where}: missing 'content'")
        content = msg["content"]
        if isinstance(content, str):
            out.append(Message(role, content))
        elif isinstance(content, list):
            parts = tuple(_parse_part(p, f"{where}, part {j}", base_dir) for j, p in enumerate(content))
            out.append(Message(role, parts))
        else:
            raise MessagesError(f"{where}: 'content' must be a string or a list of parts, got "
                                f"{type(content).__name__}")
    return out


def load_messages(path: str | os.PathLike) -> list[Message]:
    """Read and validate a messages JSON file (media paths relative to the file)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError as e:
        raise MessagesError(f"messages file not found: {path}") from e
    except json.JSONDecodeError as e:
        raise MessagesError(f"{path}: malformed JSON ({e})") from e
    except UnicodeDecodeError as e:
        raise MessagesError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from e
    return parse_messages(data, os.path.dirname(os.path.abspath(path)))


def render_prompt(tokenizer: Tokenizer, messages: Sequence[Message | dict], *, add_generation_prompt: bool = True,
                  **template_kwargs) -> str:
    """The chat template's text for `messages` (placeholders not yet expanded)."""
    dicts = [m.to_template() if isinstance(m, Message) else dict(m) for m in messages]
    return tokenizer.apply_chat_template(dicts, add_generation_prompt=add_generation_prompt, **template_kwargs)


def placeholder_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """{"audio": id of <|audio_pad|>, "image": ..., "video": ...} for this tokenizer."""
    out = {}
    for kind, (name, fallback) in PLACEHOLDERS.items():
        token = tokenizer.named_tokens.get(name, fallback)
        out[kind] = tokenizer.token_to_id(token)
    return out


def expand_placeholders(ids: Sequence[int], placeholders: dict[str, int],
                        counts: dict[str, Sequence[int]]) -> list[int]:
    """Replace the k-th placeholder of each kind by counts[kind][k] copies of itself."""
    by_id = {tid: kind for kind, tid in placeholders.items()}
    seen = {kind: sum(1 for t in ids if t == tid) for kind, tid in placeholders.items()}
    for kind in placeholders:
        given = list(counts.get(kind, ()))
        if seen[kind] != len(given):
            raise MessagesError(f"the prompt has {seen[kind]} {kind} placeholder(s) but {len(given)} {kind} token "
                                "count(s) were given")
        for k, n in enumerate(given):
            if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
                raise MessagesError(f"{kind} token count {k} must be a positive integer, got {n!r}")
    next_index = dict.fromkeys(placeholders, 0)
    out: list[int] = []
    for t in ids:
        kind = by_id.get(t)
        if kind is None:
            out.append(int(t))
            continue
        out.extend([int(t)] * int(counts[kind][next_index[kind]]))
        next_index[kind] += 1
    return out


@dataclasses.dataclass(frozen=True)
class VideoAudio:
    """What audio-in-video needs to lay out one video: its grid (t, h, w) in patches, second_per_grid
    (temporal_patch_size / fps) and the number of tokens the audio encoder gives its audio track."""

    grid_thw: tuple[int, int, int]
    second_per_grid: float
    audio_tokens: int


def audio_in_video_order(video: VideoAudio, *, merge_size: int = 2,
                         position_id_per_seconds: float = 13.0) -> np.ndarray:
    """bool [n_video + n_audio]: True where the interleaved sequence has a video token, False for audio.

    Qwen3OmniMoeProcessor.replace_video_with_audio_token's rule: video token j (temporal grid t_j, h*w/merge**2
    tokens per grid) sits at time t_j * second_per_grid * position_id_per_seconds (float64), audio token k at
    time k; the two are merged by time with video first on ties. (get_rope_index makes the same comparison in
    float32; the two agree except where t * second_per_grid * 13 lands within float32 rounding of an integer.)
    """
    t, h, w = (int(v) for v in video.grid_thw)
    per_grid = (h // merge_size) * (w // merge_size)
    v_time = np.repeat((np.arange(t, dtype=np.int64) * float(video.second_per_grid)) * float(position_id_per_seconds),
                       per_grid)
    a_time = np.arange(int(video.audio_tokens), dtype=np.int64)
    # Audio token k precedes video token j iff k < time_j (ties go to the video token).
    audio_before = np.searchsorted(a_time, v_time, side="left")
    is_video = np.zeros(v_time.size + a_time.size, bool)
    is_video[np.arange(v_time.size) + audio_before] = True
    return is_video


def _check_video_audio(k: int, va, merge_size: int):
    if not isinstance(va, VideoAudio):
        raise MessagesError(f"video {k}: audio-in-video layout must be a VideoAudio, got {type(va).__name__}")
    grid = va.grid_thw
    if len(grid) != 3 or any(isinstance(g, bool) or not isinstance(g, numbers.Integral) or g < 1 for g in grid):
        raise MessagesError(f"video {k}: grid_thw must be three positive integers, got {grid!r}")
    if grid[1] % merge_size or grid[2] % merge_size:
        raise MessagesError(f"video {k}: grid {tuple(grid)} is not divisible by the merge size {merge_size}")
    spg = va.second_per_grid
    if isinstance(spg, bool) or not isinstance(spg, numbers.Real) or not math.isfinite(spg) or spg <= 0:
        raise MessagesError(f"video {k}: second_per_grid must be a positive number, got {spg!r}")
    n = va.audio_tokens
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise MessagesError(f"video {k}: its audio token count must be a positive integer, got {n!r}")


def build_prompt(tokenizer: Tokenizer, messages: Sequence[Message | dict], *, audio_token_counts: Sequence[int] = (),
                 image_token_counts: Sequence[int] = (), video_token_counts: Sequence[int] = (),
                 add_generation_prompt: bool = True, use_audio_in_video: bool = False,
                 video_audio: Sequence[VideoAudio] = (), merge_size: int = 2,
                 position_id_per_seconds: float = 13.0, **template_kwargs) -> list[int]:
    """Prompt token ids with every media placeholder expanded.

    audio_token_counts[k]: tokens the audio encoder gives the k-th audio part (in prompt order); image_token_counts[k]
    and video_token_counts[k]: t*h*w / merge_size**2 of the k-th image / video grid.

    use_audio_in_video: each video's `<|video_pad|>` becomes `<|audio_start|>` + its video and audio tokens
    interleaved by time (`audio_in_video_order`) + `<|audio_end|>`, described by video_audio[k] for the k-th
    video (video_token_counts may then be left empty); audio_token_counts covers the audio parts only. The chat
    template renders a video part the same way with or without audio-in-video.
    """
    text = render_prompt(tokenizer, messages, add_generation_prompt=add_generation_prompt, **template_kwargs)
    ids = tokenizer.encode(text)
    places = placeholder_ids(tokenizer)
    if not use_audio_in_video:
        counts = {"audio": audio_token_counts, "image": image_token_counts, "video": video_token_counts}
        return expand_placeholders(ids, places, counts)

    n_videos = sum(1 for t in ids if t == places["video"])
    if len(video_audio) != n_videos:
        raise MessagesError(f"audio-in-video: the prompt has {n_videos} video placeholder(s) but "
                            f"{len(video_audio)} video/audio layout(s) were given")
    for k, va in enumerate(video_audio):
        _check_video_audio(k, va, merge_size)
    grid_counts = [math.prod(int(g) for g in va.grid_thw) // merge_size ** 2 for va in video_audio]
    if video_token_counts and [int(c) for c in video_token_counts] != grid_counts:
        raise MessagesError(f"audio-in-video: video_token_counts {list(video_token_counts)} disagree with the "
                            f"video grids ({grid_counts} tokens)")
    # Audio parts and images expand as usual; each video placeholder is kept single, then replaced below.
    ids = expand_placeholders(ids, places, {"audio": audio_token_counts, "image": image_token_counts,
                                            "video": [1] * n_videos})
    start, end = (tokenizer.token_to_id(tokenizer.named_tokens.get(name, fallback))
                  for name, fallback in (("audio_bos_token", "<|audio_start|>"), ("audio_eos_token", "<|audio_end|>")))
    out: list[int] = []
    k = 0
    for t in ids:
        if t != places["video"]:
            out.append(t)
            continue
        order = audio_in_video_order(video_audio[k], merge_size=merge_size,
                                     position_id_per_seconds=position_id_per_seconds)
        out.append(start)
        out.extend(np.where(order, places["video"], places["audio"]).tolist())
        out.append(end)
        k += 1
    return out

"""Messages -> everything the thinker needs: prompt ids with placeholders expanded, encoder inputs, TM-RoPE
positions and the rope delta for decoding (what transformers' processor + get_rope_index produce together).

Host-side (numpy) work only; the model-side merge is `Thinker.input_embeddings`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from omni_jax.config import OmniConfig
from omni_jax.errors import OmniJaxError
from omni_jax.positions import get_rope_index, rope_index_kwargs
from omni_jax.processing import chat
from omni_jax.processing.audio import load_audio, log_mel_features, num_audio_tokens
from omni_jax.processing.tokenizer import PROCESSOR_DEFAULTS, Tokenizer
from omni_jax.processing.video import load_video_audio

# Qwen3OmniMoeProcessor's own value (a processor attribute, not read from any file) for the audio-in-video
# token layout; the model's positions use the thinker config's position_id_per_seconds.
PROCESSOR_POSITION_ID_PER_SECONDS = PROCESSOR_DEFAULTS["position_id_per_seconds"]


class PromptError(OmniJaxError):
    """Inputs that cannot form a prompt (placeholder/feature count mismatch, too-long media, ...)."""


@dataclasses.dataclass
class ThinkerPrompt:
    """One conversation, ready for the thinker.

    input_ids: list of ids (placeholders expanded); positions: float32 [3, L]; delta: rope delta for decoding;
    audio: (features float32 [Na, mel, T], frame_lengths int32 [Na]) or None; image / video:
    (pixel_values float32 [P, C*T*p*p], grid ((t, h, w), ...)) or None; video_second_per_grid: per video.
    """

    input_ids: list[int]
    positions: np.ndarray
    delta: float
    audio: tuple | None = None
    image: tuple | None = None
    video: tuple | None = None
    video_second_per_grid: tuple[float, ...] = ()

    @property
    def has_media(self) -> bool:
        return self.audio is not None or self.image is not None or self.video is not None


def check_placeholder_counts(ids: Sequence[int], cfg: OmniConfig, *, audio_tokens: int = 0, image_tokens: int = 0,
                             video_tokens: int = 0):
    """The number of each placeholder must equal the encoder rows that will fill it."""
    t = cfg.thinker_config
    arr = np.asarray(ids)
    for name, tid, want in (("audio", t.audio_token_id, audio_tokens), ("image", t.image_token_id, image_tokens),
                            ("video", t.video_token_id, video_tokens)):
        have = int((arr == tid).sum())
        if have != want:
            raise PromptError(f"{name} placeholder/feature count mismatch: the prompt has {have} {name} tokens but "
                              f"the {name} encoder produces {want} rows")


def _load_audios(messages, max_seconds: float | None, use_audio_in_video: bool):
    """Audio inputs in prompt order: each audio part, and (audio-in-video) each video's audio track where the
    video appears — the order transformers' processor gives its audio slots, and the order the prompt's audio
    tokens appear in. Returns ((features, frames) or None, token counts of the audio parts, token counts of the
    videos' tracks)."""
    kinds = ("audio", "video") if use_audio_in_video else ("audio",)
    parts = [p for m in messages if not isinstance(m.content, str) for p in m.content if p.type in kinds]
    if not parts:
        return None, [], []
    waves = [load_audio(p.path, max_seconds=max_seconds) if p.type == "audio"
             else load_video_audio(p.path, max_seconds=max_seconds) for p in parts]
    feats, mask = log_mel_features(waves)
    frames = mask.sum(-1).astype(np.int32)
    counts = [int(num_audio_tokens(int(f))) for f in frames]
    standalone = [c for p, c in zip(parts, counts) if p.type == "audio"]
    in_video = [c for p, c in zip(parts, counts) if p.type == "video"]
    return (feats, frames), standalone, in_video


def _load_images(messages, merge: int):
    parts = chat.media_parts(messages, "image")
    if not parts:
        return None, []
    from omni_jax.processing.vision import preprocess_images

    pixels, grids = preprocess_images([p.path for p in parts])
    grids = tuple(tuple(int(v) for v in g) for g in grids)
    return (pixels, grids), [t * h * w // (merge * merge) for t, h, w in grids]


def _load_videos(messages, merge: int):
    """Every video part: .npy frame arrays or containers (processing.video.load_video: frames sampled at the
    part's fps, default min(2, source fps) for containers and 1.0 for .npy); second_per_grid = 2 / that fps."""
    parts = chat.media_parts(messages, "video")
    if not parts:
        return None, [], ()
    from omni_jax.processing.video import load_video
    from omni_jax.processing.vision import preprocess_video

    pixels, grids, spg = [], [], []
    for p in parts:
        frames, fps = load_video(p.path, p.fps)
        px, grid, s = preprocess_video(frames, fps)
        pixels.append(px)
        grids.append(tuple(int(v) for v in grid))
        spg.append(float(s))
    return ((np.concatenate(pixels), tuple(grids)), [t * h * w // (merge * merge) for t, h, w in grids],
            tuple(spg))


def prepare_thinker_prompt(tokenizer: Tokenizer, cfg: OmniConfig, messages, *, max_audio_seconds: float | None = None,
                           use_audio_in_video: bool = False) -> ThinkerPrompt:
    """Load and preprocess every media part, build the expanded prompt and its TM-RoPE positions.

    use_audio_in_video: every video's audio track (a container with an audio stream is required) joins the audio
    inputs at the video's place in the prompt, and its tokens are interleaved with the video's by time inside
    `<|vision_start|><|audio_start|>...<|audio_end|><|vision_end|>` (chat.build_prompt), as transformers'
    processor does with `load_audio_from_video=True`; positions use get_rope_index(use_audio_in_video=True).
    Without video parts the flag changes nothing (as in the reference). A video without an audio stream raises
    NoAudioStreamError (transformers lays a silent video out without audio, but its get_rope_index with
    use_audio_in_video counts only images and audio segments, so such a prompt gets wrong positions there).
    """
    merge = cfg.thinker_config.vision_config.spatial_merge_size
    audio, audio_counts, video_audio_counts = _load_audios(messages, max_audio_seconds, use_audio_in_video)
    image, image_counts = _load_images(messages, merge)
    video, video_counts, spg = _load_videos(messages, merge)
    if use_audio_in_video and video is not None:
        layouts = [chat.VideoAudio(g, s, n) for g, s, n in zip(video[1], spg, video_audio_counts, strict=True)]
        ids = chat.build_prompt(tokenizer, messages, audio_token_counts=audio_counts, image_token_counts=image_counts,
                                use_audio_in_video=True, video_audio=layouts, merge_size=merge,
                                position_id_per_seconds=PROCESSOR_POSITION_ID_PER_SECONDS)
    else:
        ids = chat.build_prompt(tokenizer, messages, audio_token_counts=audio_counts, image_token_counts=image_counts,
                                video_token_counts=video_counts)
    check_placeholder_counts(ids, cfg, audio_tokens=sum(audio_counts) + sum(video_audio_counts),
                             image_tokens=sum(image_counts), video_tokens=sum(video_counts))
    pos, delta = get_rope_index(
        np.asarray([ids]), None, image_grid_thw=image[1] if image else None,
        video_grid_thw=video[1] if video else None, second_per_grids=list(spg) if spg else None,
        audio_seqlens=list(audio[1]) if audio else None, use_audio_in_video=use_audio_in_video,
        **rope_index_kwargs_for(cfg), dtype=np.float32)
    # float32 like the reference: video times (t * second_per_grid * 13) can be fractional and carry over.
    return ThinkerPrompt(ids, pos[:, 0], float(delta[0, 0]), audio, image, video, spg)


def rope_index_kwargs_for(cfg: OmniConfig) -> dict:
    t = cfg.thinker_config
    if t.vision_start_token_id is None:  # text/audio prompts never read it
        t = t.replace(vision_start_token_id=t.image_token_id)
    return rope_index_kwargs(t)

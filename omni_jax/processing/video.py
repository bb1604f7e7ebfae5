"""Video files -> sampled RGB frames and the audio track (PyAV), for the vision encoder and audio-in-video.

Formats: `.npy` frame arrays uint8 [T, H, W, 3] (taken as already sampled) and any container FFmpeg reads through
PyAV (mp4, webm, mkv, mov, avi, ...).

Frame sampling for containers follows the reference video processor's `do_sample_frames` rule (reference spec
§5.2; `Qwen2VLVideoProcessor.sample_frames`): for `total` decoded frames at source rate `src_fps` and a target
rate `fps`,

    max_frames = floor(min(768, total) / 2) * 2
    num_frames = floor(min(max(total / src_fps * fps, 4), max_frames, total) / 2) * 2
    indices    = int(float32(arange(0, total, total / num_frames)))

(float32 truncation and the arange length ceil(total / step) as torch computes them: the index list can be one
longer than num_frames, e.g. total 30 / num 26 gives 27 indices; the processor then pads to an even count).

fps and second_per_grid (pitfall P16): the prompt's video timing is `second_per_grid = 2 / fps`.
  * fps given for a container: frames are sampled at `fps` by the rule above and `fps` is returned, exactly as
    the reference processor does with `do_sample_frames=True, fps=fps` (when the 4-frame minimum or the source's
    own frame count binds, the frames fed are denser than `fps`; the reference still times them at `fps`).
  * no fps for a container: we sample at min(DEFAULT_FPS = 2.0, src_fps) (Qwen's own video pipeline samples at
    2 fps) and return that rate, so the prompt's timing matches the frames fed. (The reference processor,
    given pre-decoded frames and no fps, would assume 1.0 fps whatever the frames' real rate.)
  * `.npy`: every frame is used; `fps` is the rate the frames were sampled at, 1.0 (the processor default)
    when not given.

The audio track (`load_video_audio`) is decoded with PyAV at its own rate, mixed to mono by averaging channels
and resampled to 16 kHz with librosa (soxr) — the same steps `processing.audio.load_audio` applies to audio files,
so a track gives the same samples whether it comes in a video or as a separate file. (transformers decodes a
video's audio with torchcodec, i.e. FFmpeg's own down-mix and resampler; that path is not installed here and is
not compared.)
"""

from __future__ import annotations

import math
import os

import numpy as np

from omni_jax.errors import check_input_file
from omni_jax.processing.audio import SAMPLING_RATE
from omni_jax.processing.vision import VisionInputError, load_video_npy

DEFAULT_FPS = 2.0
MIN_FRAMES = 4
MAX_FRAMES = 768
TEMPORAL_PATCH_SIZE = 2


class VideoError(VisionInputError):
    """A video file that cannot be used: unreadable container, no video stream, no frames, bad fps, ..."""


class NoAudioStreamError(VideoError):
    """Audio-in-video was requested for a video without an audio stream."""


def _check_fps(fps, path) -> float:
    if isinstance(fps, bool) or not isinstance(fps, (int, float, np.integer, np.floating)) or not math.isfinite(fps) \
            or fps <= 0:
        raise VideoError(f"video {os.fspath(path)!r}: fps must be a positive number, got {fps!r}")
    return float(fps)


def sample_frame_indices(total: int, src_fps: float, fps: float, *, temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
                         min_frames: int = MIN_FRAMES, max_frames: int = MAX_FRAMES) -> np.ndarray:
    """Indices (int64, ascending) of the frames to keep out of `total` at `src_fps` to sample `fps` frames/s.

    The reference processor's rule (module docstring). Fewer than `temporal_patch_size` frames (where the
    reference would divide by zero) keep every frame.
    """
    if total < 1:
        raise VideoError("video has zero frames")
    if total < temporal_patch_size:
        return np.arange(total, dtype=np.int64)
    cap = math.floor(min(max_frames, total) / temporal_patch_size) * temporal_patch_size
    n = total / src_fps * fps
    n = min(max(n, min_frames), cap, total)
    n = math.floor(n / temporal_patch_size) * temporal_patch_size
    step = total / n
    size = math.ceil(total / step)
    # torch.arange(0, total, step) in float32 (values computed in float64, stored as float32), then .int().
    return (np.arange(size, dtype=np.float64) * step).astype(np.float32).astype(np.int64)


def _open(path: str):
    import av

    check_input_file(path, "video", VideoError)
    try:
        return av.open(path)
    except av.FFmpegError as e:
        raise VideoError(f"cannot read video file {path!r}: not a readable media container ({e})") from e


def _source_fps(stream, path: str) -> float:
    for rate in (stream.average_rate, stream.guessed_rate, stream.base_rate):
        if rate is not None and float(rate) > 0 and math.isfinite(float(rate)):
            return float(rate)
    raise VideoError(f"video file {path!r}: the video stream reports no frame rate")


def _count_packets(path: str) -> int:
    """Video packets holding data (one per frame for the codecs in practical use); decoding confirms it."""
    with _open(path) as c:
        stream = c.streams.video[0]
        return sum(1 for pkt in c.demux(stream) if pkt.size > 0)


def _decode_selected(path: str, keep: np.ndarray) -> tuple[list[np.ndarray], int]:
    """(RGB uint8 frames [H, W, 3] at the indices in `keep`, number of frames decoded in total)."""
    import av

    wanted = {int(i) for i in keep}  # strictly increasing: the sampling step is >= 1 frame
    out: dict[int, np.ndarray] = {}
    size = None
    count = 0
    with _open(path) as c:
        try:
            for frame in c.decode(video=0):
                if count in wanted:
                    if size is None:  # a mid-stream resolution change is rescaled to the first kept size
                        size = (frame.width, frame.height)
                    out[count] = frame.to_ndarray(format="rgb24", width=size[0], height=size[1])
                count += 1
        except av.FFmpegError as e:
            raise VideoError(f"cannot decode video file {path!r} (frame {count}): {e}") from e
    return [out[int(i)] for i in keep if int(i) in out], count


def probe_video(path) -> dict:
    """{"frames": decodable frame count estimate (packets), "fps": source frame rate, "has_audio": bool,
    "width", "height"} of a container. Raises VideoError when there is no video stream."""
    path = os.fspath(path)
    with _open(path) as c:
        if not c.streams.video:
            raise VideoError(f"video file {path!r} has no video stream")
        v = c.streams.video[0]
        info = {"fps": _source_fps(v, path), "has_audio": bool(c.streams.audio),
                "width": v.codec_context.width, "height": v.codec_context.height}
    info["frames"] = _count_packets(path)
    return info


def load_video(path, fps: float | None = None) -> tuple[np.ndarray, float]:
    """Frames uint8 [T, H, W, 3] (RGB) to feed the vision encoder, and the rate they stand for (fps_used).

    `.npy`: all frames, fps_used = fps or 1.0. Containers: frames sampled at `fps` (default min(2.0, source
    fps)) by the reference's rule; fps_used = that rate. second_per_grid = 2 / fps_used. Raises VideoError.
    """
    path = os.fspath(path)
    if fps is not None:
        fps = _check_fps(fps, path)
    if path.lower().endswith(".npy"):
        frames = load_video_npy(path)
        if frames.shape[0] == 0:
            raise VideoError(f"video {path!r} has zero frames")
        return frames, 1.0 if fps is None else fps
    info = probe_video(path)
    src = info["fps"]
    target = min(DEFAULT_FPS, src) if fps is None else fps
    total = info["frames"]
    if total == 0:
        raise VideoError(f"video file {path!r} has zero frames")
    keep = sample_frame_indices(total, src, target)
    frames, decoded = _decode_selected(path, keep)
    if decoded != total:  # packet count was not the frame count: select again with the real count
        if decoded == 0:
            raise VideoError(f"video file {path!r} has zero decodable frames")
        keep = sample_frame_indices(decoded, src, target)
        frames, _ = _decode_selected(path, keep)
    return np.stack(frames), target


def _to_float_planar(frame) -> np.ndarray:
    """One decoded audio frame -> float32 [C, N] in [-1, 1] (PCM scaling as FFmpeg converts formats)."""
    x = frame.to_ndarray()
    channels = frame.layout.nb_channels
    if not frame.format.is_planar:  # packed: [1, N * C], interleaved
        x = x.reshape(-1, channels).T
    name = frame.format.name.rstrip("p")
    if name == "u8":
        x = (x.astype(np.float32) - 128.0) / 128.0
    elif name == "s16":
        x = x.astype(np.float32) / 32768.0
    elif name == "s32":
        x = (x.astype(np.float64) / 2147483648.0).astype(np.float32)
    elif name == "s64":
        x = (x.astype(np.float64) / 9223372036854775808.0).astype(np.float32)
    elif name in ("flt", "dbl"):
        x = x.astype(np.float32)
    else:
        raise VideoError(f"unsupported audio sample format {frame.format.name!r}")
    return x


def load_video_audio(path, sampling_rate: int = SAMPLING_RATE, max_seconds: float | None = None) -> np.ndarray:
    """The first audio stream of a video container as float32 mono samples [N] at `sampling_rate`.

    Raises NoAudioStreamError when the container has no audio stream and VideoError for an unreadable or empty
    one, or one longer than `max_seconds`.
    """
    import av

    path = os.fspath(path)
    if path.lower().endswith(".npy"):
        raise NoAudioStreamError(f"video {path!r} is a frame array (.npy) and has no audio stream; "
                                 "audio-in-video needs a container (mp4, mkv, webm, ...) with an audio track")
    chunks = []
    with _open(path) as c:
        if not c.streams.audio:
            raise NoAudioStreamError(f"video file {path!r} has no audio stream (needed for audio-in-video)")
        stream = c.streams.audio[0]
        rate = None
        try:
            for frame in c.decode(stream):
                if rate is None:
                    rate = frame.sample_rate
                elif frame.sample_rate != rate:
                    raise VideoError(f"video file {path!r}: the audio sample rate changes mid-stream")
                chunks.append(_to_float_planar(frame))
        except av.FFmpegError as e:
            raise VideoError(f"cannot decode the audio stream of {path!r}: {e}") from e
    if not chunks or sum(ch.shape[1] for ch in chunks) == 0:
        raise VideoError(f"the audio stream of {path!r} has no samples")
    if rate is None or rate <= 0:
        raise VideoError(f"the audio stream of {path!r} reports an invalid sample rate {rate}")
    data = np.concatenate(chunks, axis=1)
    wav = data.mean(axis=0, dtype=np.float32) if data.shape[0] > 1 else data[0]
    if not np.all(np.isfinite(wav)):
        raise VideoError(f"the audio stream of {path!r} contains NaN or infinite samples")
    if max_seconds is not None and wav.shape[0] / rate > max_seconds:
        raise VideoError(f"the audio stream of {path!r} is {wav.shape[0] / rate:.2f} s long, more than the limit "
                         f"of {max_seconds:g} s")
    if rate != sampling_rate:
        import librosa

        wav = librosa.resample(wav, orig_sr=rate, target_sr=sampling_rate)
    return np.ascontiguousarray(wav, dtype=np.float32)

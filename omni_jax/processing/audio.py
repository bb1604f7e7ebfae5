"""Audio input: load and resample files, Whisper log-mel features, and the audio token count.

The features equal transformers' `WhisperFeatureExtractor` as the released Qwen3-Omni processor configures and calls
it (feature_size 128, 16 kHz, n_fft 400, hop 160, pad to the batch's longest sample, no truncation, attention mask
returned); see reference spec §4.1 and pitfall P7. Everything here is host-side numpy.
"""

from __future__ import annotations

import functools
import os
import warnings

import numpy as np

from omni_jax.errors import OmniJaxError, check_input_file

SAMPLING_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 128
# Encoder chunking (spec §3): a full chunk is 2 * n_window = 100 mel frames and yields 13 tokens.
N_WINDOW = 50
TOKENS_PER_FULL_CHUNK = 13


class AudioError(OmniJaxError):
    """An audio input that cannot be used: missing, empty, undecodable, too short or too long."""


# ---------------------------------------------------------------------------------------------------------------
# Loading


def _decode(path: str) -> tuple[np.ndarray, int]:
    """(samples float32 [N, C], sample rate). soundfile first (wav/flac/ogg), librosa/audioread for the rest."""
    import soundfile as sf

    try:
        data, sr = sf.read(path, dtype="float32", always_2d=True)
        return data, int(sr)
    except Exception as sf_err:  # soundfile raises LibsndfileError/RuntimeError/TypeError on formats it lacks
        first = sf_err
    try:
        import librosa

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # librosa warns when it falls back from soundfile to audioread
            data, sr = librosa.load(path, sr=None, mono=False)
    except Exception as lr_err:
        raise AudioError(f"cannot decode audio file {path!r}: unsupported format or corrupt data "
                         f"(soundfile: {first}; librosa: {type(lr_err).__name__}: {lr_err})") from lr_err
    data = np.asarray(data, np.float32)
    data = data[:, None] if data.ndim == 1 else data.T  # librosa gives [C, N] for multichannel
    return data, int(sr)


def _check_length(seconds: float, max_seconds: float | None, path: str):
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(f"audio file {path!r} is {seconds:.2f} s long, more than the limit of {max_seconds:g} s")


def load_audio(path, sampling_rate: int = SAMPLING_RATE, max_seconds: float | None = None) -> np.ndarray:
    """Read an audio file as mono float32 samples at `sampling_rate` (16 kHz for the model).

    Multichannel audio is mixed down by averaging channels; other rates are resampled with librosa (soxr).
    Raises AudioError for a missing, empty, corrupt or unsupported file and for audio longer than `max_seconds`.
    Returns float32 [N].
    """
    path = os.fspath(path)
    check_input_file(path, "audio", AudioError)
    if max_seconds is not None:  # cheap header check before decoding a long file
        try:
            import soundfile as sf

            info = sf.info(path)
            header_seconds = info.frames / info.samplerate if info.samplerate else None
        except Exception:
            header_seconds = None
        if header_seconds is not None:
            _check_length(header_seconds, max_seconds, path)
    data, sr = _decode(path)
    if data.size == 0 or data.shape[0] == 0:
        raise AudioError(f"audio file contains no samples (0 samples): {path!r}")
    if sr <= 0:
        raise AudioError(f"audio file {path!r} reports an invalid sample rate {sr}")
    wav = data.mean(axis=1, dtype=np.float32) if data.shape[1] > 1 else data[:, 0]
    if not np.all(np.isfinite(wav)):
        raise AudioError(f"audio file {path!r} contains NaN or infinite samples")
    _check_length(wav.shape[0] / sr, max_seconds, path)
    if sr != sampling_rate:
        import librosa

        wav = librosa.resample(wav, orig_sr=sr, target_sr=sampling_rate)
    return np.ascontiguousarray(wav, dtype=np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Log-mel features


@functools.lru_cache(maxsize=8)
def mel_filters(sampling_rate: int = SAMPLING_RATE, n_fft: int = N_FFT, n_mels: int = N_MELS) -> np.ndarray:
    """Slaney-scale, slaney-normalised triangular filters, 0..8000 Hz. float64 [n_fft//2 + 1, n_mels]."""
    import librosa

    fb = librosa.filters.mel(sr=sampling_rate, n_fft=n_fft, n_mels=n_mels, fmin=0.0, fmax=8000.0, htk=False,
                             norm="slaney", dtype=np.float64)
    return np.ascontiguousarray(fb.T)


@functools.lru_cache(maxsize=8)
def hann_window(n: int) -> np.ndarray:
    """Periodic Hann window (torch.hann_window default), float64 [n]."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def _log_mel_one(wav: np.ndarray, num_frames: int, n_fft: int, hop: int, filters: np.ndarray,
                 frame_block: int) -> np.ndarray:
    """log10 mel power of one (padded) waveform, first `num_frames` centred frames. float64 [n_mels, num_frames]."""
    half = n_fft // 2
    padded = np.pad(wav.astype(np.float64), (half, half), mode="reflect")  # centre=True, reflect (torch.stft)
    frames = np.lib.stride_tricks.sliding_window_view(padded, n_fft)[::hop]  # [1 + L//hop, n_fft], a view
    window = hann_window(n_fft)
    out = np.empty((filters.shape[1], num_frames), np.float64)
    # Blocks of frames only bound host memory for long audio (a 40-minute file has 240k frames).
    for s in range(0, num_frames, frame_block):
        e = min(s + frame_block, num_frames)
        spec = np.fft.rfft(frames[s:e] * window, axis=-1)  # [F, n_fft//2 + 1]
        power = spec.real ** 2 + spec.imag ** 2
        out[:, s:e] = (power @ filters).T
    return np.log10(np.maximum(out, 1e-10))


def log_mel_features(waveforms, sampling_rate: int = SAMPLING_RATE, n_fft: int = N_FFT,
                     hop_length: int = HOP_LENGTH, n_mels: int = N_MELS,
                     frame_block: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """Whisper log-mel features of a batch, padded to the longest waveform (the Qwen3-Omni processor's call).

    waveforms: list of float arrays [N_b] at `sampling_rate` (cast to float32 first, as the extractor does).
    Returns (features float32 [B, n_mels, T], frame_mask int32 [B, T]) with T = max_b N_b // hop_length.
    Per example: zero-pad to the longest, reflect-centred STFT with a periodic Hann window, last frame dropped,
    power -> slaney mel -> log10(max(., 1e-10)) -> max(., example max - 8) -> (x + 4) / 4. The mask is the
    sample-level mask taken every hop_length samples, so a shorter example has ceil(N_b / hop) valid frames
    (one more than N_b // hop unless N_b is a multiple of hop), capped at T.
    """
    if isinstance(waveforms, np.ndarray) and waveforms.ndim == 1:
        waveforms = [waveforms]
    if len(waveforms) == 0:
        raise AudioError("log_mel_features needs at least one waveform")
    wavs = []
    for i, w in enumerate(waveforms):
        w = np.asarray(w, dtype=np.float32)
        if w.ndim != 1:
            raise AudioError(f"waveform {i} must be mono 1-D samples, got shape {w.shape}")
        if w.shape[0] == 0:
            raise AudioError(f"waveform {i} is empty (0 samples)")
        if not np.all(np.isfinite(w)):
            raise AudioError(f"waveform {i} contains NaN or infinite samples")
        wavs.append(w)
    lengths = np.array([w.shape[0] for w in wavs], np.int64)
    longest = int(lengths.max())
    if longest <= n_fft // 2:
        raise AudioError(f"audio too short: the longest waveform has {longest} samples; the centred STFT needs "
                         f"more than {n_fft // 2} ({(n_fft // 2 + 1) / sampling_rate * 1000:.1f} ms)")
    num_frames = longest // hop_length
    filters = mel_filters(sampling_rate, n_fft, n_mels)
    feats = np.empty((len(wavs), n_mels, num_frames), np.float32)
    for b, w in enumerate(wavs):
        padded = np.zeros(longest, np.float32)
        padded[: w.shape[0]] = w
        log_spec = _log_mel_one(padded, num_frames, n_fft, hop_length, filters, frame_block)
        log_spec = np.maximum(log_spec, log_spec.max() - 8.0)  # floor relative to this example's global max
        feats[b] = (log_spec + 4.0) / 4.0
    # Sample mask [B, longest] sampled at 0, hop, 2*hop, ...; the extractor drops the last sampled column when
    # `longest % hop != 0`, which always leaves exactly `num_frames` columns.
    starts = np.arange(num_frames, dtype=np.int64) * hop_length
    frame_mask = (starts[None, :] < lengths[:, None]).astype(np.int32)
    return feats, frame_mask


# ---------------------------------------------------------------------------------------------------------------
# Token count


def num_audio_tokens(num_frames, n_window: int = N_WINDOW):
    """Audio tokens the encoder emits for `num_frames` mel frames (`_get_feat_extract_output_lengths`, spec §3).

    13 tokens per full chunk of 2 * n_window frames plus three stride-2 halvings of the remainder (a zero
    remainder adds nothing). Works on Python ints (returns int) and on numpy / jax integer arrays (floor division).
    """
    chunk = 2 * n_window
    rem = num_frames % chunk
    f = (rem - 1) // 2 + 1
    n = ((f - 1) // 2 + 1 - 1) // 2 + 1 + (num_frames // chunk) * TOKENS_PER_FULL_CHUNK
    return int(n) if isinstance(num_frames, (int, np.integer)) else n

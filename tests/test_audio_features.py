"""Audio input: Whisper log-mel features and frame mask vs transformers, token count, and bad-file errors."""

import numpy as np
import pytest
import soundfile as sf

from omni_jax.processing import audio as A

transformers = pytest.importorskip("transformers")
from transformers import WhisperFeatureExtractor  # noqa: E402
from transformers.audio_utils import mel_filter_bank  # noqa: E402
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths  # noqa: E402


@pytest.fixture(scope="module")
def extractor():
    # The released preprocessor_config.json (spec §4.1).
    return WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, n_fft=400,
                                   chunk_length=300, padding_value=0.0, return_attention_mask=True)


def _processor_call(fe, wavs):
    """How Qwen3OmniMoeProcessor calls the extractor (its audio_kwargs defaults)."""
    return fe(wavs, sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True,
              return_tensors="np")


def _signals(lengths, seed):
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        t = np.arange(n) / 16000
        tone = np.sin(2 * np.pi * rng.uniform(80, 4000) * t) * rng.uniform(0.05, 0.5)
        out.append((tone + rng.standard_normal(n) * rng.uniform(1e-3, 0.3)).astype(np.float32))
    return out


def test_mel_filters_equal_transformers():
    ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=128, min_frequency=0.0, max_frequency=8000.0,
                          sampling_rate=16000, norm="slaney", mel_scale="slaney")
    np.testing.assert_allclose(A.mel_filters(), ref, rtol=0, atol=1e-7)  # measured 4.5e-16


@pytest.mark.parametrize("lengths", [[16000], [16001], [12345], [3210], [12345, 40000, 169, 320], [32000, 16001],
                                     [40159, 250, 40000]])
def test_features_match_whisper_extractor(extractor, lengths):
    wavs = _signals(lengths, seed=sum(lengths))
    feats, mask = A.log_mel_features(wavs)
    ref = _processor_call(extractor, wavs)
    assert feats.dtype == np.float32 and mask.dtype == np.int32
    assert feats.shape == ref["input_features"].shape == (len(lengths), 128, max(lengths) // 160)
    np.testing.assert_array_equal(mask, ref["attention_mask"])
    # The processor's default path is torch.stft in float32; its rounding noise reaches ~1.6e-5 near silent or
    # edge frames, while we compute in float64. Against transformers' float64 numpy path we agree to ~1e-7.
    np.testing.assert_allclose(feats, ref["input_features"], rtol=0, atol=3e-5)
    padded = np.zeros((len(wavs), max(lengths)), np.float32)
    for b, w in enumerate(wavs):
        padded[b, : len(w)] = w
    ref64 = extractor._np_extract_fbank_features(padded, "cpu")
    np.testing.assert_allclose(feats, ref64, rtol=0, atol=1e-6)


def test_frame_mask_edge_cases(extractor):
    # A shorter example gets ceil(len / 160) valid frames (one more than len // 160), capped at T.
    wavs = _signals([16000, 15841, 15999, 16000 - 160], seed=3)
    _, mask = A.log_mel_features(wavs)
    np.testing.assert_array_equal(mask.sum(-1), [100, 100, 100, 99])
    np.testing.assert_array_equal(mask, _processor_call(extractor, wavs)["attention_mask"])
    wavs = _signals([16170, 16165], seed=4)  # longest not a multiple of 160: last sampled column dropped
    _, mask = A.log_mel_features(wavs)
    np.testing.assert_array_equal(mask.sum(-1), [101, 101])
    np.testing.assert_array_equal(mask, _processor_call(extractor, wavs)["attention_mask"])


def test_num_audio_tokens_matches_reference():
    import torch

    frames = np.arange(0, 3001)
    ref = _get_feat_extract_output_lengths(torch.from_numpy(frames), 50).numpy()
    np.testing.assert_array_equal(A.num_audio_tokens(frames), ref)
    for n, want in [(100, 13), (250, 33), (1000, 130), (1337, 174), (60, 8), (300, 39), (30000, 3900)]:
        got = A.num_audio_tokens(n)
        assert got == want and isinstance(got, int)


# ---------------------------------------------------------------------------------------------------------------
# Loading


def test_load_audio_mono_resample(tmp_path):
    rng = np.random.default_rng(0)
    stereo = (rng.standard_normal((44100 // 2, 2)) * 0.1).astype(np.float32)
    path = tmp_path / "stereo.wav"
    sf.write(path, stereo, 44100, subtype="FLOAT")
    wav = A.load_audio(path)
    import librosa

    want = librosa.resample(stereo.mean(axis=1), orig_sr=44100, target_sr=16000)
    assert wav.dtype == np.float32 and wav.shape == (8000,)
    np.testing.assert_allclose(wav, want, atol=1e-6)
    flac = tmp_path / "mono.flac"
    sf.write(flac, stereo[:, 0], 16000)
    assert A.load_audio(flac).shape == (22050,)


def test_load_audio_missing(tmp_path):
    with pytest.raises(A.AudioError, match="not found"):
        A.load_audio(tmp_path / "nope.wav")


def test_load_audio_empty(tmp_path):
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    with pytest.raises(A.AudioError, match="empty"):
        A.load_audio(empty)
    no_samples = tmp_path / "nosamples.wav"
    sf.write(no_samples, np.zeros((0,), np.float32), 16000)
    with pytest.raises(A.AudioError, match="0 samples"):
        A.load_audio(no_samples)


def test_load_audio_corrupt(tmp_path):
    bad = tmp_path / "noise.wav"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(A.AudioError, match="cannot decode"):
        A.load_audio(bad)


def test_load_audio_too_long(tmp_path):
    path = tmp_path / "long.wav"
    sf.write(path, np.zeros(16000 * 3, np.float32), 16000)
    assert A.load_audio(path, max_seconds=3.0).shape == (48000,)
    with pytest.raises(A.AudioError, match=r"3\.00 s long, more than the limit of 2\.5 s"):
        A.load_audio(path, max_seconds=2.5)


def test_log_mel_bad_waveforms():
    with pytest.raises(A.AudioError, match="too short"):
        A.log_mel_features([np.zeros(150, np.float32)])
    with pytest.raises(A.AudioError, match="empty"):
        A.log_mel_features([np.zeros(16000, np.float32), np.zeros(0, np.float32)])
    with pytest.raises(A.AudioError, match="mono"):
        A.log_mel_features([np.zeros((2, 16000), np.float32)])
    with pytest.raises(A.AudioError, match="NaN"):
        A.log_mel_features([np.full(16000, np.nan, np.float32)])

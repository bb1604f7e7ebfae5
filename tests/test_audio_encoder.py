"""AuT audio encoder parity with transformers' Qwen3OmniMoeAudioEncoder (fp32, randomly re-initialised)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import (  # noqa: E402
    Qwen3OmniMoeAudioEncoderConfig,
)
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (  # noqa: E402
    Qwen3OmniMoeAudioEncoder,
    SinusoidsPositionEmbedding,
)

from omni_jax.checkpoint import keys_audio  # noqa: E402
from omni_jax.checkpoint.assign import load_tensors  # noqa: E402
from omni_jax.config import AudioEncoderConfig  # noqa: E402
from omni_jax.models.audio_encoder import AudioEncoder, packed_row_index, sinusoid_table  # noqa: E402
from omni_jax.processing.audio import num_audio_tokens  # noqa: E402

CONFIGS = {
    # spec §11 tiny audio config (attention window 13 * 8 = 104 tokens)
    "tiny": dict(d_model=32, encoder_attention_heads=4, encoder_ffn_dim=64, encoder_layers=2, num_mel_bins=128,
                 downsample_hidden_size=16, output_dim=64, n_window=50, n_window_infer=800),
    # other widths, 6 heads of 8, 3 layers, window 13 * 4 = 52 tokens
    "wide": dict(d_model=48, encoder_attention_heads=6, encoder_ffn_dim=40, encoder_layers=3, num_mel_bins=128,
                 downsample_hidden_size=8, output_dim=24, n_window=50, n_window_infer=400),
}


def _randomise(model, seed):
    """Every tensor random with a random scale (biases and LayerNorm weights too), attention made sharp."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = float(torch.empty(()).uniform_(0.3, 1.5, generator=g))
            if p.ndim > 1:
                fan_in = int(np.prod(p.shape[1:]))
                scale = scale * (2.5 if ("q_proj" in name or "k_proj" in name) else 1.0) / fan_in ** 0.5
            p.copy_(torch.randn(p.shape, generator=g) * scale)


_PAIRS: dict = {}


def _pair(name: str):
    """(transformers encoder, ours) of one config, built once per session."""
    if name not in _PAIRS:
        kw = CONFIGS[name]
        torch.manual_seed(0)
        hf = Qwen3OmniMoeAudioEncoder(Qwen3OmniMoeAudioEncoderConfig(**kw)).eval()
        _randomise(hf, seed=len(name))
        # Abstract build (no eager random init), then every parameter comes from the checkpoint.
        ours = nnx.eval_shape(lambda: AudioEncoder(AudioEncoderConfig(**kw), rngs=nnx.Rngs(0)))
        load_tensors(ours, {"thinker.audio_tower." + k: v.numpy() for k, v in hf.state_dict().items()},
                     root="thinker.audio_tower", rules=keys_audio.RULES)
        _PAIRS[name] = (hf, ours)
    return _PAIRS[name]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request):
    return _pair(request.param)


@nnx.jit(static_argnames=("conv_batch",))
def _encode(model, feats, lengths, conv_batch=None):
    return model(feats, lengths, conv_batch=conv_batch)


def _features(lengths, seed, frames=None, pad_value=0.7):
    """[B, 128, frames or max(lengths)] features; padding frames hold a non-zero value the encoder must ignore."""
    rng = np.random.default_rng(seed)
    feats = np.full((len(lengths), 128, frames or max(lengths)), pad_value, np.float32)
    for b, n in enumerate(lengths):
        feats[b, :, :n] = rng.standard_normal((128, n)) * 0.8 - 0.2
    return feats


def _reference(hf, feats, lengths):
    cat = np.concatenate([feats[b, :, :n] for b, n in enumerate(lengths)], axis=1)
    with torch.no_grad():
        return hf(input_features=torch.from_numpy(cat), feature_lens=torch.tensor(lengths)).last_hidden_state.numpy()


def _ours(model, feats, lengths, conv_batch=None):
    tokens, token_lengths = _encode(model, jnp.asarray(feats), jnp.asarray(lengths, jnp.int32), conv_batch)
    tokens, token_lengths = np.asarray(tokens), np.asarray(token_lengths)
    assert tokens.shape[:2] == (len(lengths), num_audio_tokens(feats.shape[-1]))
    np.testing.assert_array_equal(token_lengths, [num_audio_tokens(n) for n in lengths])
    for b, n in enumerate(token_lengths):
        assert not tokens[b, n:].any(), "rows past an audio's tokens must be zero"
    return np.concatenate([tokens[b, :n] for b, n in enumerate(token_lengths)])


def _check(hf, ours, lengths, seed=0, frames=None):
    feats = _features(lengths, seed, frames)
    ref = _reference(hf, feats, lengths)
    got = _ours(ours, feats, lengths)
    # fp32 on both sides; measured max abs error ~1e-6 at output scale ~2-5.
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    return feats, ref, got


# 0.6 s, 1 s, 2.5 s, 13.4 s (beyond one 104-token window), 61 s; a mixed batch; an all-short batch; multiples.
# Batches of equal size share one compile: features are padded to 61 s (one audio), 0.6 s (two) or 13.4 s (three);
# frames past an audio's length are ignored.
# All-short batches: the longest chunk (60, 45 frames) sets the conv padding; 45 gives odd conv lengths (23, 12).
CASES = [[60], [100], [250], [1340], [6100], [250, 1340, 60], [60, 45], [45, 21], [200, 100, 7]]
WIDE_CASES = [[60], [1340], [6100], [250, 1340, 60], [45, 21]]  # fewer compiles for the second config


@pytest.mark.parametrize("name,lengths", [("tiny", c) for c in CASES] + [("wide", c) for c in WIDE_CASES])
def test_encoder_parity(name, lengths):
    hf, ours = _pair(name)
    _check(hf, ours, lengths, seed=sum(lengths), frames={1: 6100, 2: 60, 3: 1340}[len(lengths)])


def test_padding_leak_depends_on_batch(pair):
    """P5: a partial chunk's last token sees the zero padding up to the batch's longest chunk."""
    hf, ours = pair
    feats = _features([60, 45], seed=5)
    alone = _reference(hf, feats[1:, :, :45], [45])
    together = _reference(hf, feats, [60, 45])[8:]
    # The leak is real in the reference (the last stem token differs; attention spreads it over the window).
    assert np.abs(alone - together).max() > 1e-3
    single = np.pad(feats[1:, :, :45], ((0, 0), (0, 0), (0, 6100 - 45)))
    np.testing.assert_allclose(_ours(ours, single, [45]), alone, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_ours(ours, feats, [60, 45])[8:], together, rtol=1e-5, atol=1e-5)


@nnx.jit
def _encode_alone(model, feats, lengths, longest):
    return model(feats, lengths, longest_frames=longest)


def test_audios_encoded_alone_equal_the_batch():
    """Serving encodes each audio of a prompt alone, its frames zero-padded to a bucket (here 1600): with
    longest_frames = the prompt's longest audio, each equals its rows of the joint (reference) encoding, partial
    chunks included (P5; without it the 45-frame audio gets `alone` of test_padding_leak_depends_on_batch). One
    config: the windows and padding are the same code for both."""
    hf, ours = _pair("tiny")
    lengths = [1340, 45]  # several chunks and windows; a short partial chunk padded to the other's full chunks
    feats = _features(lengths, seed=13)
    together = _reference(hf, feats, lengths)
    got = []
    for b, n in enumerate(lengths):
        x = np.zeros((1, 128, 1600), np.float32)
        x[0, :, :n] = feats[b, :, :n]
        tokens, token_lengths = _encode_alone(ours, jnp.asarray(x), jnp.asarray([n], jnp.int32), max(lengths))
        got.append(np.asarray(tokens)[0, :int(token_lengths[0])])
    np.testing.assert_allclose(np.concatenate(got), together, rtol=1e-5, atol=1e-5)


def test_windows_matter(pair):
    """The 13.4 s case would fail with one window over the whole audio: the window size is exercised."""
    hf, _ = pair
    feats = _features([1340], seed=7)
    ref = _reference(hf, feats, [1340])
    saved = hf.n_window_infer
    hf.n_window_infer = 100 * 1000
    try:
        one_window = _reference(hf, feats, [1340])
    finally:
        hf.n_window_infer = saved
    assert np.abs(ref - one_window).max() > 1e-3


def test_conv_batches_equal_one_call(pair):
    """The bounded conv-stem batches (lax.map, used for long audio) give the same result as one call."""
    _, ours = pair
    lengths = [250, 1340, 60]
    feats = _features(lengths, seed=11)
    np.testing.assert_allclose(_ours(ours, feats, lengths, conv_batch=4), _ours(ours, feats, lengths),
                               rtol=1e-6, atol=1e-6)


def test_sinusoid_table():
    ref = SinusoidsPositionEmbedding(1500, 64).positional_embedding.numpy()
    np.testing.assert_allclose(sinusoid_table(1500, 64), ref, rtol=0, atol=2e-4)  # fp32 sin of args up to 1500
    np.testing.assert_allclose(sinusoid_table(13, 1280), SinusoidsPositionEmbedding(13, 1280).positional_embedding,
                               rtol=0, atol=1e-6)


def test_bad_config_and_input():
    with pytest.raises(ValueError, match="n_window"):
        AudioEncoder(AudioEncoderConfig(**{**CONFIGS["tiny"], "n_window": 30}), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="n_window_infer"):
        AudioEncoder(AudioEncoderConfig(**{**CONFIGS["tiny"], "n_window_infer": 50}), rngs=nnx.Rngs(0))
    enc = nnx.eval_shape(lambda: AudioEncoder(AudioEncoderConfig(**CONFIGS["tiny"]), rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="mel bins"):
        enc(jnp.zeros((1, 80, 100)), jnp.array([100]))


def test_packed_row_index():
    tokens = np.arange(3 * 5).reshape(3, 5)  # 3 audios, n_max 5, row id = value
    lengths = np.array([2, 5, 0])
    packed = np.concatenate([tokens[b, :n] for b, n in enumerate(lengths)])
    rows = packed_row_index(jnp.asarray(lengths), jnp.arange(packed.size), 5)
    np.testing.assert_array_equal(tokens.reshape(-1)[np.asarray(rows)], packed)


def test_eval_shape_released_size():
    """The released tower builds abstractly, and 30000 frames (300 s) give 3900 tokens of 2048."""
    cfg = AudioEncoderConfig(output_dim=2048, encoder_layers=2)  # released widths; depth only costs trace time
    out = jax.eval_shape(lambda f, n: AudioEncoder(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0))(f, n),
                         jax.ShapeDtypeStruct((1, 128, 30000), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32))
    assert out[0].shape == (1, 3900, 2048) and out[0].dtype == jnp.bfloat16

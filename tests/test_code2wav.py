"""Code2Wav parity against transformers 5.23 `Qwen3OmniMoeCode2Wav` (fp32, every tensor re-initialised with random
values of random scale): waveforms for T = 1, 10, 90 (> the 72-frame attention window), chunked decoding across
chunk boundaries, output lengths, and bad-code errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from omni_jax import config as C
from omni_jax.checkpoint.assign import load_tensors
from omni_jax.models.code2wav import Code2Wav, CodecError, sliding_window_mask

transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as M  # noqa: E402
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeCode2WavConfig  # noqa: E402


def second_config() -> C.Code2WavConfig:
    """GQA (4 q / 2 kv heads), 3 layers, 3 quantizers, small codebook, window 16, different up/downsampling."""
    return C.Code2WavConfig(codebook_size=100, hidden_size=24, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=40, num_hidden_layers=3, num_quantizers=3, sliding_window=16,
                            decoder_dim=32, upsample_rates=(4, 3, 2), upsampling_ratios=(3,), rope_theta=500.0)


CONFIGS = {"tiny": lambda: C.tiny().code2wav_config, "second": second_config}
# Gain on the last conv so the waveform sits mostly inside the clamp (checked in `_check`).
OUT_GAIN = {"tiny": 0.5, "second": 0.15}


def randomize(module: torch.nn.Module, seed: int, out_gain: float):
    """Every tensor: random values at a random per-tensor scale (norm weights around a random level).

    Scales keep activations O(1) through the decoder: SnakeBeta's sin² of large activations turns fp32 rounding
    into O(1) differences (chaotic, not a bug), and a saturated clamp would hide everything.
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = float(torch.empty(()).uniform_(0.5, 2.0, generator=g))
            noise = torch.randn(p.shape, generator=g)
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("alpha", "beta"):  # SnakeBeta, log scale
                p.copy_(0.3 * scale * noise)
            elif "norm" in name and p.ndim == 1:
                p.copy_(scale * (1.0 + 0.3 * noise))
            elif leaf in ("scale", "gamma"):  # LayerScale / ConvNeXt gamma
                p.copy_(scale * (0.5 + 0.3 * noise))
            elif p.ndim == 1:  # biases
                p.copy_(0.1 * scale * noise)
            elif "embedding" in name:
                p.copy_(scale * noise)
            elif p.ndim == 3:  # convs: [out, in, k]; transposed convs (upsample.i.0, block.1): [in, out, k]
                transposed = ".block.1." in name or (name.startswith("upsample.") and ".0.conv" in name)
                fan_in = p.shape[0] * p.shape[2] // 2 if transposed else p[0].numel()
                damp = 0.4 if (".conv1." in name or ".conv2." in name) else 1.0  # residual units
                p.copy_(damp * scale * noise / np.sqrt(fan_in))
            else:  # Linear [out, in]; q/k damped so attention is clearly position-dependent but not one-hot
                damp = 0.5 if (".q_proj." in name or ".k_proj." in name) else 1.0
                p.copy_(damp * scale * noise / np.sqrt(p.shape[-1]))
        last = module.decoder[-1].conv.weight  # keep the waveform mostly inside the clamp
        last.mul_(out_gain)


def _build(name):
    cfg = CONFIGS[name]()
    torch.manual_seed(0)
    hf = M.Qwen3OmniMoeCode2Wav(Qwen3OmniMoeCode2WavConfig(**cfg.to_hf())).eval().float()
    randomize(hf, seed=3 if name == "tiny" else 4, out_gain=OUT_GAIN[name])
    ours = nnx.eval_shape(lambda: Code2Wav(cfg, rngs=nnx.Rngs(0)))
    load_tensors(ours, {f"code2wav.{k}": v.numpy() for k, v in hf.state_dict().items()}, root="code2wav")
    graphdef, state = nnx.split(ours)
    decode = jax.jit(lambda st, codes: nnx.merge(graphdef, st)(codes))
    return cfg, hf, ours, lambda codes: decode(state, codes)


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    return _build(request.param)


def _codes(cfg, b, t, seed):
    return np.random.RandomState(seed).randint(0, cfg.codebook_size, (b, cfg.num_quantizers, t))


def _check(got, ref):
    assert got.shape == ref.shape, (got.shape, ref.shape)
    # the clamp must not hide everything: most samples are inside (-1, 1)
    assert np.mean(np.abs(ref) < 0.999) > 0.7
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-4)


@pytest.mark.parametrize("t", [1, 10, 90])
def test_waveform_matches_hf(pair, t):
    cfg, hf, ours, decode = pair
    codes = _codes(cfg, 2, t, seed=t)
    with torch.no_grad():
        ref = hf(torch.tensor(codes)).numpy()
    got = np.asarray(decode(jnp.asarray(codes, jnp.int32)))
    assert got.shape == (2, 1, ours.output_length(t))
    if cfg.upsample_rates == (8, 5, 4, 3) and cfg.upsampling_ratios == (2, 2):
        assert got.shape[-1] == 1920 * t - 555
    _check(got, ref)


def test_pre_transformer_window_matters(pair):
    """Transformer output vs HF; a frame influences later frames only within the stacked receptive field
    num_layers * (window - 1) (each layer looks back window - 1 frames)."""
    cfg, hf, ours, _ = pair
    w, n = cfg.sliding_window, cfg.num_hidden_layers
    reach = n * (w - 1)
    t = reach + 3
    codes = _codes(cfg, 1, t, seed=0)
    codes2 = codes.copy()
    codes2[..., 0] = (codes2[..., 0] + 1) % cfg.codebook_size
    graphdef, state = nnx.split(ours)
    f = jax.jit(lambda st, c: nnx.merge(graphdef, st).pre_transformer(nnx.merge(graphdef, st).embed(c)))
    a, b = np.asarray(f(state, jnp.asarray(codes))), np.asarray(f(state, jnp.asarray(codes2)))
    with torch.no_grad():
        ref = hf.pre_transformer(inputs_embeds=hf.code_embedding(torch.tensor(codes) + hf.code_offset).mean(1))
    np.testing.assert_allclose(a, ref.last_hidden_state.numpy(), rtol=1e-5, atol=1e-5 * np.abs(a).max())
    assert np.abs(a[0, reach] - b[0, reach]).max() > 1e-6  # still inside the receptive field
    np.testing.assert_array_equal(a[0, reach + 1:], b[0, reach + 1:])  # outside it: bit-identical
    m = np.asarray(sliding_window_mask(5, 2))[0]
    np.testing.assert_array_equal(m, np.array([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0],
                                               [0, 0, 0, 1, 1]], bool))


def test_chunked_decode_matches_hf():
    """700 frames with the default chunking: three chunks (300, 300 + 25 context, 100 + 25 context). Uses the
    second config (72x upsampling) to stay cheap; the 1920x path is covered by test_waveform_matches_hf."""
    cfg, hf, ours, decode = _build("second")
    codes = _codes(cfg, 1, 700, seed=7)
    with torch.no_grad():
        ref = hf.chunked_decode(torch.tensor(codes)).numpy()
    got = np.asarray(ours.chunked_decode(jnp.asarray(codes, jnp.int32), decode_fn=decode))
    assert got.shape[-1] == 700 * ours.total_upsample - 3 * (ours.total_upsample - ours.output_length(1))
    _check(got, ref)


def test_chunked_decode_context_rule():
    """Second config only (cheaper compiles); chunk 5, context 7 over 20 frames: start 0 -> no context,
    start 5 -> context 5 (= start, since 5 - 7 <= 0),
    starts 10, 15 -> context 7. Chunk lengths 5, 10, 12, 12."""
    cfg, hf, ours, decode = _build("second")
    codes = _codes(cfg, 2, 20, seed=11)
    with torch.no_grad():
        ref = hf.chunked_decode(torch.tensor(codes), chunk_size=5, left_context_size=7).numpy()
    got = np.asarray(ours.chunked_decode(jnp.asarray(codes, jnp.int32), chunk_size=5, left_context_size=7,
                                         decode_fn=decode))
    _check(got, ref)


def test_bad_codes_raise(pair):
    cfg, _, ours, _ = pair
    good = _codes(cfg, 1, 4, seed=0)
    with pytest.raises(CodecError, match="quantizers"):
        ours(jnp.asarray(good[:, :-1]))
    with pytest.raises(CodecError, match="shape"):
        ours(jnp.asarray(good[0]))
    bad = good.copy()
    bad[0, 1, 2] = cfg.codebook_size
    with pytest.raises(CodecError, match=r"codebook_size.*first offender"):
        ours(jnp.asarray(bad))
    bad[0, 1, 2] = -1
    with pytest.raises(ValueError, match="codebook_size"):
        ours.chunked_decode(jnp.asarray(bad))
    with pytest.raises(CodecError, match="integers"):
        ours(jnp.asarray(good, jnp.float32))

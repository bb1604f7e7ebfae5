"""Code2Wav: codec codes [B, G, T] -> 24 kHz waveform [B, 1, 1920*T - 555] (reference §7, pitfall P14).

    codes -> mean of G codebook embeddings (one shared table, offset q*codebook_size per quantizer)
          -> pre_transformer: causal sliding-window (72 incl. the current token) decoder with LayerScale
          -> upsample: (causal transposed conv k=s=2, ConvNeXt block) x 2
          -> decoder: causal conv -> 4 x (SnakeBeta, causal transposed conv k=2r s=r, 3 residual units)
                      -> SnakeBeta -> causal conv -> clamp(-1, 1)

Activations are channels-last ([B, T, C]); convolutions use `lax.conv_general_dilated` with NWC/WIO layouts
(kernels [K, C_in/groups, C_out], see the "conv1d" / "convT1d" transforms in checkpoint/keys.py). Module lists
mirror the checkpoint's `upsample.{i}.{0,1}` / `decoder.{i}` / `block.{j}` numbering with nnx.List, so the key
table (checkpoint/keys_code2wav.py) only maps weight names and layouts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni_jax.config import Code2WavConfig
from omni_jax.errors import OmniJaxError
from omni_jax.kernels.attention import AttentionMask
from omni_jax.layers.attention import Attention
from omni_jax.layers.core import Embed, LayerNorm, Linear, RMSNorm, gelu_exact, param
from omni_jax.layers.mlp import GatedMLP
from omni_jax.layers.rope import cos_sin, rope_angles


class CodecError(OmniJaxError):
    """Codes that the codec decoder cannot decode (wrong shape, ids out of range)."""


# ---------------------------------------------------------------------------------------------------------------
# Convolutions (channels-last)


def _conv(x, kernel, bias, *, padding: tuple[int, int], stride: int = 1, dilation: int = 1, lhs_dilation: int = 1,
          groups: int = 1):
    """x [B, T, C_in], kernel [K, C_in/groups, C_out], bias [C_out] -> [B, T', C_out]."""
    y = jax.lax.conv_general_dilated(x, kernel.astype(x.dtype), window_strides=(stride,), padding=[padding],
                                     lhs_dilation=(lhs_dilation,), rhs_dilation=(dilation,),
                                     dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups)
    return y + bias.astype(x.dtype)


class ConvWeights(nnx.Module):
    """The `conv` child of the reference's causal (transposed) conv wrappers: kernel [K, I, O], bias [O]."""

    def __init__(self, k: int, d_in: int, d_out: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = param(rngs, (k, d_in, d_out), ("kernel", "conv_in", "conv_out"), dtype,
                            scale=1.0 / np.sqrt(k * d_in))
        self.bias = param(rngs, (d_out,), ("conv_out",), dtype, init="zeros")


class CausalConv(nnx.Module):
    """Conv1d with left zero padding (k_eff - stride) and the reference's extra right padding so that the output
    covers every input frame: out length = ceil(L / stride). k_eff = (k-1)*dilation + 1."""

    def __init__(self, d_in: int, d_out: int, k: int, *, dilation: int = 1, stride: int = 1, groups: int = 1,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv = ConvWeights(k, d_in // groups, d_out, dtype=dtype, rngs=rngs)
        self.dilation, self.stride, self.groups = dilation, stride, groups
        self.k_eff = (k - 1) * dilation + 1
        self.left = self.k_eff - stride

    def __call__(self, x):
        """x [B, L, C_in] -> [B, ceil(L/stride), C_out]."""
        length = x.shape[1]
        n_frames = (length - self.k_eff + self.left) / self.stride + 1
        ideal = (int(np.ceil(n_frames)) - 1) * self.stride + (self.k_eff - self.left)
        right = ideal - length
        return _conv(x, self.conv.kernel[...], self.conv.bias[...], padding=(self.left, right), stride=self.stride,
                     dilation=self.dilation, groups=self.groups)


class CausalTransConv(nnx.Module):
    """ConvTranspose1d(k, s) with k - s samples trimmed from both ends: out length (L-1)*s + 2s - k.

    Computed as a convolution of the s-dilated input with the flipped kernel; the trim is folded into the padding
    ((k-1) - (k-s) = s-1 on each side). Kernel layout [K, C_in, C_out] (torch [C_in, C_out, K], "convT1d").
    """

    def __init__(self, d_in: int, d_out: int, k: int, stride: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        if k < stride:
            raise ValueError(f"CausalTransConv needs kernel_size >= stride, got k={k}, s={stride}")
        self.conv = ConvWeights(k, d_in, d_out, dtype=dtype, rngs=rngs)
        self.k, self.stride = k, stride

    def __call__(self, x):
        """x [B, L, C_in] -> [B, (L-1)*s + 2s - k, C_out]."""
        pad = self.stride - 1
        return _conv(x, jnp.flip(self.conv.kernel[...], axis=0), self.conv.bias[...], padding=(pad, pad),
                     lhs_dilation=self.stride)


class SnakeBeta(nnx.Module):
    """y = x + 1/(exp(beta) + 1e-9) * sin(exp(alpha) * x)^2, per channel; alpha/beta stored in log space."""

    def __init__(self, channels: int, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.alpha = param(rngs, (channels,), ("norm",), dtype, init="zeros")
        self.beta = param(rngs, (channels,), ("norm",), dtype, init="zeros")

    def __call__(self, x):
        """x [B, T, C]."""
        alpha = jnp.exp(self.alpha[...].astype(x.dtype))
        beta = jnp.exp(self.beta[...].astype(x.dtype))
        return x + (1.0 / (beta + 1e-9)) * jnp.square(jnp.sin(x * alpha))


class ConvNeXtBlock(nnx.Module):
    """x + gamma * pwconv2(gelu(pwconv1(LN(dwconv(x))))), dwconv causal depthwise k=7, LN eps 1e-6."""

    def __init__(self, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.dwconv = CausalConv(dim, dim, 7, groups=dim, dtype=dtype, rngs=rngs)
        self.norm = LayerNorm(dim, 1e-6, dtype=dtype, rngs=rngs)
        self.pwconv1 = Linear(dim, 4 * dim, ("embed", "mlp"), use_bias=True, dtype=dtype, rngs=rngs)
        self.pwconv2 = Linear(4 * dim, dim, ("mlp", "embed"), use_bias=True, dtype=dtype, rngs=rngs)
        self.gamma = nnx.Param(jnp.full((dim,), 1e-6, dtype), logical_axes=("norm",))

    def __call__(self, x):
        """x [B, T, C] -> [B, T, C]."""
        h = self.pwconv2(gelu_exact(self.pwconv1(self.norm(self.dwconv(x)))))
        return x + self.gamma[...].astype(x.dtype) * h


class ResidualUnit(nnx.Module):
    """x + conv2(act2(conv1(act1(x)))), conv1 causal k=7 dilated, conv2 k=1."""

    def __init__(self, dim: int, dilation: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.act1 = SnakeBeta(dim, dtype=dtype, rngs=rngs)
        self.conv1 = CausalConv(dim, dim, 7, dilation=dilation, dtype=dtype, rngs=rngs)
        self.act2 = SnakeBeta(dim, dtype=dtype, rngs=rngs)
        self.conv2 = CausalConv(dim, dim, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return x + self.conv2(self.act2(self.conv1(self.act1(x))))


class DecoderBlock(nnx.Module):
    """block = [SnakeBeta(in), CausalTransConv(in -> out, k=2r, s=r), ResidualUnit(out, d) for d in (1, 3, 9)]."""

    def __init__(self, d_in: int, d_out: int, rate: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.block = nnx.List([SnakeBeta(d_in, dtype=dtype, rngs=rngs),
                               CausalTransConv(d_in, d_out, 2 * rate, rate, dtype=dtype, rngs=rngs),
                               *[ResidualUnit(d_out, d, dtype=dtype, rngs=rngs) for d in (1, 3, 9)]])

    def __call__(self, x):
        for m in self.block:
            x = m(x)
        return x


# ---------------------------------------------------------------------------------------------------------------
# Pre-transformer


class LayerScale(nnx.Module):
    def __init__(self, dim: int, init: float, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.scale = nnx.Param(jnp.full((dim,), init, dtype), logical_axes=("norm",))

    def __call__(self, x):
        return self.scale[...].astype(x.dtype) * x


class TransformerLayer(nnx.Module):
    """x += ls1 * attn(RMSNorm(x)); x += ls2 * mlp(RMSNorm(x)). No QK-norm; 1-D RoPE."""

    def __init__(self, cfg: Code2WavConfig, head_dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.self_attn = Attention(h, cfg.num_attention_heads, cfg.num_key_value_heads, head_dim, qk_norm=False,
                                   use_bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = GatedMLP(h, cfg.intermediate_size, dtype=dtype, rngs=rngs)
        self.self_attn_layer_scale = LayerScale(h, cfg.layer_scale_initial_scale, dtype=dtype)
        self.mlp_layer_scale = LayerScale(h, cfg.layer_scale_initial_scale, dtype=dtype)

    def __call__(self, x, cos, sin, mask, attention_impl: str = "auto"):
        a, _ = self.self_attn(self.input_layernorm(x), cos, sin, mask, impl=attention_impl)
        x = x + self.self_attn_layer_scale(a)
        return x + self.mlp_layer_scale(self.mlp(self.post_attention_layernorm(x)))


def sliding_window_mask(length: int, window: int) -> jnp.ndarray:
    """bool [1, T, T]: key j visible to query i iff i - window < j <= i (the window includes the current token).
    The model passes the rule as data (AttentionMask(causal=True, window=window)); this boolean is its reference."""
    return AttentionMask(causal=True, window=window).dense(1, length, length)


class PreTransformer(nnx.Module):
    def __init__(self, cfg: Code2WavConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.head_dim = cfg.extra.get("head_dim") or cfg.hidden_size // cfg.num_attention_heads
        self.layers = nnx.List([TransformerLayer(cfg, self.head_dim, dtype=dtype, rngs=rngs)
                                for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)

    def __call__(self, x, attention_impl: str = "auto"):
        """x [B, T, H] -> final-normed [B, T, H]; positions 0..T-1; causal sliding-window attention."""
        b, t, _ = x.shape
        with jax.named_scope("rope"):
            pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))
            cos, sin = cos_sin(rope_angles(pos, self.head_dim, self.cfg.rope_theta), x.dtype)
        mask = AttentionMask(causal=True, window=self.cfg.sliding_window)
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                x = layer(x, cos, sin, mask, attention_impl)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------------------------
# The codec decoder


class Code2Wav(nnx.Module):
    def __init__(self, cfg: Code2WavConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        h = cfg.hidden_size
        self.code_embedding = Embed(cfg.codebook_size * cfg.num_quantizers, h, dtype=dtype, rngs=rngs)
        self.pre_transformer = PreTransformer(cfg, dtype=dtype, rngs=rngs)
        self.upsample = nnx.List([nnx.List([CausalTransConv(h, h, f, f, dtype=dtype, rngs=rngs),
                                            ConvNeXtBlock(h, dtype=dtype, rngs=rngs)])
                                  for f in cfg.upsampling_ratios])
        dims = [cfg.decoder_dim // 2 ** i for i in range(len(cfg.upsample_rates) + 1)]
        self.decoder = nnx.List([
            CausalConv(h, cfg.decoder_dim, 7, dtype=dtype, rngs=rngs),
            *[DecoderBlock(dims[i], dims[i + 1], r, dtype=dtype, rngs=rngs) for i, r in enumerate(cfg.upsample_rates)],
            SnakeBeta(dims[-1], dtype=dtype, rngs=rngs),
            CausalConv(dims[-1], 1, 7, dtype=dtype, rngs=rngs),
        ])

    @property
    def total_upsample(self) -> int:
        return self.cfg.total_upsample

    def output_length(self, num_frames: int) -> int:
        """Samples produced for `num_frames` codec frames (1920*T - 555 for the released config)."""
        n = num_frames
        for f in self.cfg.upsampling_ratios:
            n = n * f
        for r in self.cfg.upsample_rates:
            n = (n - 1) * r
        return n

    def validate_codes(self, codes) -> None:
        """Raise CodecError for codes not shaped [B, num_quantizers, T>=1] or (when concrete) out of range."""
        cfg = self.cfg
        if codes.ndim != 3:
            raise CodecError(f"code2wav expects codes of shape [batch, num_quantizers, frames], got {codes.shape}")
        if codes.shape[1] != cfg.num_quantizers:
            raise CodecError(f"code2wav expects {cfg.num_quantizers} quantizers (codebooks) on axis 1, got "
                             f"{codes.shape[1]} (codes shape {tuple(codes.shape)})")
        if codes.shape[2] < 1:
            raise CodecError("code2wav needs at least one frame of codes")
        if not jnp.issubdtype(codes.dtype, jnp.integer):
            raise CodecError(f"code2wav codes must be integers, got dtype {codes.dtype}")
        if isinstance(codes, jax.core.Tracer):
            return  # values unknown under tracing: callers validate before jit
        arr = np.asarray(codes)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi >= cfg.codebook_size:
            bad = np.argwhere((arr < 0) | (arr >= cfg.codebook_size))[0]
            raise CodecError(f"code2wav codes must lie in [0, {cfg.codebook_size}) (codebook_size); got values in "
                             f"[{lo}, {hi}], first offender {int(arr[tuple(bad)])} at [batch, quantizer, frame] = "
                             f"{bad.tolist()}")

    def embed(self, codes):
        """codes int [B, G, T] -> mean over quantizers of code_embedding(codes + q*codebook_size): [B, T, H]."""
        offset = (jnp.arange(self.cfg.num_quantizers) * self.cfg.codebook_size)[None, :, None]
        return jnp.mean(self.code_embedding(codes + offset), axis=1)

    def __call__(self, codes, attention_impl: str = "auto"):
        """codes int [B, G, T] -> waveform [B, 1, output_length(T)] in [-1, 1] (activation dtype = param dtype)."""
        self.validate_codes(codes)
        with jax.named_scope("code_embedding"):
            x = self.embed(codes)
        with jax.named_scope("pre_transformer"):
            x = self.pre_transformer(x, attention_impl)
        with jax.named_scope("upsample"):
            for stage in self.upsample:
                for m in stage:
                    x = m(x)
        with jax.named_scope("decoder"):
            for m in self.decoder:
                x = m(x)
        return jnp.swapaxes(jnp.clip(x, -1.0, 1.0), 1, 2)

    def chunked_decode(self, codes, chunk_size: int = 300, left_context_size: int = 25, decode_fn=None):
        """The reference's streaming-style decode: chunks [s, min(s+chunk, T)) each decoded with up to
        `left_context_size` extra frames of left context (none for the first chunk, or when s - ctx <= 0), whose
        samples are dropped; results concatenated (no crossfade; each chunk is short by the tail loss).

        codes int [B, G, T] -> [B, 1, N]. decode_fn: optional replacement for `self(codes_chunk)` (e.g. a jitted
        version of this module); chunk shapes are static per call.
        """
        self.validate_codes(codes)
        decode = self if decode_fn is None else decode_fn
        total = codes.shape[-1]
        wavs, start = [], 0
        while start < total:
            end = min(start + chunk_size, total)
            ctx = left_context_size if start - left_context_size > 0 else start
            wav = decode(codes[..., start - ctx:end])
            wavs.append(wav[..., ctx * self.total_upsample:])
            start = end
        return jnp.concatenate(wavs, axis=-1)

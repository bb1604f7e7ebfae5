"""AuT audio encoder: log-mel chunks -> stride-8 conv stem -> windowed-attention transformer -> projection.

Attribute names mirror `thinker.audio_tower.*` in the checkpoint (spec §9.1); the math follows spec §4.2 and
pitfalls P5/P6. Layout: the reference concatenates all audios' tokens into one packed sequence; here every
audio keeps its own row so that shapes are static under jit:

  features [B, M, T] --(100-frame chunks)--> [B*K, M, 100] --conv stem--> [B*K, 13, D] = [B, K*13, D]
  --(windows of W = 13 * (n_window_infer // 100) tokens)--> [B*Kw, W, D] blocks --layers--> tokens [B, N, out]

Because only an audio's last chunk can be partial, its tokens are the first `num_audio_tokens(len)` rows of
its K*13 chunk slots. Attention runs inside fixed-size blocks with a key-validity mask, so time and memory are
linear in the audio length (never an L x L mask): each window is a batch row whose live keys are a prefix
(AttentionMask(kv_lengths=...)).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni_jax.config import AudioEncoderConfig
from omni_jax.kernels.attention import AttentionMask, attention
from omni_jax.layers.core import LayerNorm, Linear, gelu_exact, param
from omni_jax.processing.audio import TOKENS_PER_FULL_CHUNK, num_audio_tokens


def sinusoid_table(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper-style fixed positions, float32 [length, channels]: row p = [sin(p * inv), cos(p * inv)].

    inv_i = exp(-i * ln(max_timescale) / (channels/2 - 1)); computed in float32 like the reference.
    """
    if channels % 2:
        raise ValueError(f"sinusoid_table needs an even number of channels, got {channels}")
    half = channels // 2
    increment = np.log(max_timescale) / (half - 1)
    inv = np.exp((-increment * np.arange(half, dtype=np.float32)).astype(np.float32))
    scaled = np.arange(length, dtype=np.float32)[:, None] * inv[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def conv_out_len(n):
    """Output length of Conv(k=3, s=2, p=1): ceil(n / 2). Works on ints and integer arrays."""
    return (n - 1) // 2 + 1


class Conv2d(nnx.Module):
    """torch Conv2d(k, stride, padding) on NHWC activations; kernel stored HWIO (transform "conv2d")."""

    def __init__(self, c_in: int, c_out: int, kernel: int = 3, stride: int = 2, padding: int = 1, *,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = param(rngs, (kernel, kernel, c_in, c_out), ("kernel", "kernel", "conv_in", "conv_out"), dtype,
                            scale=1.0 / math.sqrt(kernel * kernel * c_in))
        self.bias = param(rngs, (c_out,), ("conv_out",), dtype, init="zeros")
        self.stride, self.padding = stride, padding

    def __call__(self, x):
        """x [N, H, W, C_in] -> [N, ceil(H/2), ceil(W/2), C_out] for the stem's k=3, s=2, p=1."""
        p = self.padding
        y = jax.lax.conv_general_dilated(x, self.kernel[...].astype(x.dtype), (self.stride, self.stride),
                                         ((p, p), (p, p)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(x.dtype)


class AudioAttention(nnx.Module):
    """Bidirectional multi-head attention (q/k/v/out with bias, scale head_dim^-0.5) inside fixed blocks."""

    def __init__(self, d_model: int, num_heads: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_heads, self.head_dim = num_heads, d_model // num_heads
        self.q_proj = Linear(d_model, d_model, ("embed", "heads"), use_bias=True, dtype=dtype, rngs=rngs)
        self.k_proj = Linear(d_model, d_model, ("embed", "heads"), use_bias=True, dtype=dtype, rngs=rngs)
        self.v_proj = Linear(d_model, d_model, ("embed", "heads"), use_bias=True, dtype=dtype, rngs=rngs)
        self.out_proj = Linear(d_model, d_model, ("heads", "embed"), use_bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x, live, impl: str = "auto"):
        """x [N, W, D] (N blocks of W tokens); live int [N]: the first live[n] tokens of block n are real (the
        others are neither seen nor meaningful). Returns [N, W, D]."""
        n, w, d = x.shape
        q = self.q_proj(x).reshape(n, w, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(n, w, self.num_heads, self.head_dim)
        v = self.v_proj(x).reshape(n, w, self.num_heads, self.head_dim)
        out = attention(q, k, v, AttentionMask(kv_lengths=live), scale=self.head_dim ** -0.5, impl=impl)
        return self.out_proj(out.reshape(n, w, d))


class AudioEncoderLayer(nnx.Module):
    """Pre-LN transformer layer: x + attn(LN(x)); x + fc2(gelu(fc1(LN(x)))). LayerNorm eps 1e-5."""

    def __init__(self, cfg: AudioEncoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        d = cfg.d_model
        self.self_attn = AudioAttention(d, cfg.encoder_attention_heads, dtype=dtype, rngs=rngs)
        self.self_attn_layer_norm = LayerNorm(d, 1e-5, dtype=dtype, rngs=rngs)
        self.fc1 = Linear(d, cfg.encoder_ffn_dim, ("embed", "mlp"), use_bias=True, dtype=dtype, rngs=rngs)
        self.fc2 = Linear(cfg.encoder_ffn_dim, d, ("mlp", "embed"), use_bias=True, dtype=dtype, rngs=rngs)
        self.final_layer_norm = LayerNorm(d, 1e-5, dtype=dtype, rngs=rngs)

    def __call__(self, x, live, impl: str = "auto"):
        x = x + self.self_attn(self.self_attn_layer_norm(x), live, impl)
        x = x + self.fc2(gelu_exact(self.fc1(self.final_layer_norm(x))))
        if x.dtype == jnp.float16:  # the reference clamps only in fp16
            big = jnp.finfo(jnp.float16).max - 1000
            x = jnp.clip(x, -big, big)
        return x


class AudioEncoder(nnx.Module):
    """`thinker.audio_tower`: features [B, num_mel_bins, T] -> audio tokens [B, N, output_dim].

    One call must hold every audio that the reference would encode together (all audios of the thinker batch):
    a partial chunk's last token depends on the longest chunk in the batch (pitfall P5).
    """

    def __init__(self, cfg: AudioEncoderConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        chunk = 2 * cfg.n_window
        if conv_out_len(conv_out_len(conv_out_len(chunk))) != TOKENS_PER_FULL_CHUNK:
            # The reference hard-codes 13 tokens per full chunk in its token count.
            raise ValueError(f"audio n_window={cfg.n_window} gives chunks of {chunk} frames; the reference token "
                             f"count assumes {TOKENS_PER_FULL_CHUNK} tokens per chunk (n_window 49..52)")
        if cfg.n_window_infer < chunk:
            raise ValueError(f"audio n_window_infer={cfg.n_window_infer} must be >= 2 * n_window = {chunk}")
        if cfg.max_source_positions < TOKENS_PER_FULL_CHUNK:
            raise ValueError(f"audio max_source_positions={cfg.max_source_positions} < {TOKENS_PER_FULL_CHUNK}")
        self.cfg = cfg
        c, m = cfg.downsample_hidden_size, cfg.num_mel_bins
        self.conv2d1 = Conv2d(1, c, dtype=dtype, rngs=rngs)
        self.conv2d2 = Conv2d(c, c, dtype=dtype, rngs=rngs)
        self.conv2d3 = Conv2d(c, c, dtype=dtype, rngs=rngs)
        freq = conv_out_len(conv_out_len(conv_out_len(m)))
        self.conv_out = Linear(c * freq, cfg.d_model, (None, "embed"), dtype=dtype, rngs=rngs)
        self.layers = nnx.List([AudioEncoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.encoder_layers)])
        self.ln_post = LayerNorm(cfg.d_model, 1e-5, dtype=dtype, rngs=rngs)
        self.proj1 = Linear(cfg.d_model, cfg.d_model, ("embed", "mlp"), use_bias=True, dtype=dtype, rngs=rngs)
        self.proj2 = Linear(cfg.d_model, cfg.output_dim, ("mlp", "embed"), use_bias=True, dtype=dtype, rngs=rngs)
        self.param_dtype = dtype

    @property
    def chunk_frames(self) -> int:
        return 2 * self.cfg.n_window

    @property
    def window_tokens(self) -> int:
        """Attention window in tokens: 13 per chunk times n_window_infer // chunk (104 for the release)."""
        return TOKENS_PER_FULL_CHUNK * (self.cfg.n_window_infer // self.chunk_frames)

    def _stem(self, chunks, pad_len):
        """chunks [n, M, C] (zero beyond each chunk's length) -> [n, 13, d_model] incl. positions.

        pad_len: the batch's longest chunk (traced scalar). The reference pads every chunk only up to pad_len
        and convolves with zero padding beyond it; here chunks are always C frames long, so activations at time
        steps the reference never computes are zeroed after conv1 and conv2 (the input is zero there already).
        """
        x = chunks[..., None]  # NHWC: H = mel, W = time, C = 1
        len1 = conv_out_len(pad_len)
        len2 = conv_out_len(len1)
        x = gelu_exact(self.conv2d1(x))
        x = jnp.where((jnp.arange(x.shape[2]) < len1)[None, None, :, None], x, 0)
        x = gelu_exact(self.conv2d2(x))
        x = jnp.where((jnp.arange(x.shape[2]) < len2)[None, None, :, None], x, 0)
        x = gelu_exact(self.conv2d3(x))  # [n, F, 13, c]
        n, f, t, c = x.shape
        x = x.transpose(0, 2, 3, 1).reshape(n, t, c * f)  # flatten (channel, freq), channel-major
        x = self.conv_out(x)
        pos = sinusoid_table(t, self.cfg.d_model)  # positions restart at 0 in every chunk
        return x + jnp.asarray(pos, x.dtype)

    def __call__(self, features, frame_lengths, *, longest_frames=None, conv_batch: int | None = None,
                 attn_impl: str = "auto"):
        """features: float [B, num_mel_bins, T] (frames >= frame_lengths[b] are ignored, so T may be padded to any
        length, e.g. a serving bucket); frame_lengths: int [B] valid mel frames per audio
        (feature_attention_mask.sum(-1)). longest_frames: int scalar, the longest audio the reference encodes
        together with these (default max(frame_lengths)): only through it does one audio's result depend on the
        others (P5: partial chunks are padded to the batch's longest chunk, min(2 * n_window, longest_frames)),
        so audios encoded one call each with the batch's longest_frames equal their joint encoding.

        Returns (tokens [B, N, output_dim], token_lengths int32 [B]) with N = num_audio_tokens(T): the tokens of
        audio b are tokens[b, :token_lengths[b]] (token_lengths = num_audio_tokens(frame_lengths)); later rows
        are zero. conv_batch: chunks per conv-stem call (default cfg.conv_chunksize), which bounds the stem's
        activation memory for long audio.
        """
        cfg = self.cfg
        b, m, t = features.shape
        if m != cfg.num_mel_bins:
            raise ValueError(f"audio features have {m} mel bins, the encoder expects {cfg.num_mel_bins}")
        cw = self.chunk_frames
        k = -(-t // cw)  # chunks per audio (static)
        frame_lengths = jnp.asarray(frame_lengths, jnp.int32)
        token_lengths = num_audio_tokens(frame_lengths, cfg.n_window).astype(jnp.int32)

        with jax.named_scope("audio_chunking"):
            # Reference dtype choice: the mel input is cast to the conv weight dtype before the stem.
            x = features.astype(self.param_dtype)
            x = jnp.pad(x, ((0, 0), (0, 0), (0, k * cw - t)))
            x = jnp.where((jnp.arange(k * cw) < frame_lengths[:, None])[:, None, :], x, 0)
            chunks = x.reshape(b, m, k, cw).transpose(0, 2, 1, 3).reshape(b * k, m, cw)
            longest = jnp.max(frame_lengths) if longest_frames is None else jnp.asarray(longest_frames, jnp.int32)
            pad_len = jnp.minimum(cw, longest)  # the batch's longest chunk

        with jax.named_scope("audio_conv_stem"):
            n = b * k
            group = min(n, conv_batch or cfg.conv_chunksize)
            if group >= n:
                h = self._stem(chunks, pad_len)
            else:
                groups = -(-n // group)
                chunks = jnp.pad(chunks, ((0, groups * group - n), (0, 0), (0, 0)))
                h = jax.lax.map(lambda c: self._stem(c, pad_len), chunks.reshape(groups, group, m, cw))
                h = h.reshape(groups * group, *h.shape[2:])[:n]
            tpc = h.shape[1]
            h = h.reshape(b, k * tpc, cfg.d_model)

        with jax.named_scope("audio_windows"):
            w = self.window_tokens
            kw = -(-(k * tpc) // w)
            h = jnp.pad(h, ((0, 0), (0, kw * w - k * tpc), (0, 0))).reshape(b * kw, w, cfg.d_model)
            # Windows past an audio's end (padding, or a shorter audio of the batch) have 0 live keys: attention
            # returns zeros there and their rows are zeroed below, so nothing from them reaches a kept token.
            live = jnp.clip(token_lengths[:, None] - jnp.arange(kw)[None, :] * w, 0, w).reshape(b * kw)

        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"audio_layer_{i}"):
                h = layer(h, live, attn_impl)

        with jax.named_scope("audio_projection"):
            h = self.proj2(gelu_exact(self.proj1(self.ln_post(h))))
            n_max = num_audio_tokens(t, cfg.n_window)
            h = h.reshape(b, kw * w, -1)[:, :n_max]
            h = jnp.where((jnp.arange(n_max)[None, :] < token_lengths[:, None])[..., None], h, 0)
        return h, token_lengths


def packed_rows(tokens, token_lengths):
    """The reference's packed audio sequence as a table: tokens [B, N, D] (encoder output) -> [B * N, D] whose row
    r is the r-th token of all audios concatenated; rows past the last token repeat the last audio's rows (callers
    never read them)."""
    b, n, d = tokens.shape
    return tokens.reshape(b * n, d)[packed_row_index(token_lengths, jnp.arange(b * n), n)]


def packed_row_index(token_lengths, ranks, n_max: int):
    """Rows of `tokens.reshape(B * n_max, D)` holding the reference's packed audio tokens (all audios concatenated).

    token_lengths: int [B] from the encoder; ranks: int [...] positions in the packed sequence (e.g. the rank of
    each `<|audio_pad|>` among all audio pads of the thinker batch). Returns int32 [...]; jit-friendly. Ranks past
    the last token are clipped to the last audio (callers mask them).
    """
    token_lengths = jnp.asarray(token_lengths, jnp.int32)
    ends = jnp.cumsum(token_lengths)
    audio = jnp.clip(jnp.searchsorted(ends, ranks, side="right"), 0, token_lengths.shape[0] - 1)
    within = ranks - (ends[audio] - token_lengths[audio])
    return (audio * n_max + within).astype(jnp.int32)

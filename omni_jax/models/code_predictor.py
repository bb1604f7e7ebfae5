"""The code predictor (the talker's dense "MTP" decoder): residual codebooks 1..G-1 of one speech frame.

Checkpoint names: `talker.code_predictor.model.layers.N.{self_attn,mlp,input_layernorm,post_attention_layernorm}`,
`.model.norm`, `.model.codec_embedding.{0..G-2}`, `.lm_head.{0..G-2}`. The G-1 per-codebook tables and heads are
stored stacked ([G-1, V, H] and [G-1, H, V]; the key table fills one slice per on-disk tensor) so the per-frame
loop can pick table k with a dynamic index inside `lax.scan`.

Per frame (reference §6.4): a fresh KV cache; step 0 feeds the two rows [h_last, codec_embedding_talker(c0)] at
positions 0, 1 and reads lm_head[0] at the last row -> c1; step k = 1..G-2 feeds codec_embedding[k-1](c_k) at
position k+1 and reads lm_head[k] -> c_{k+1}.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from omni_jax.config import CodePredictorConfig
from omni_jax.layers.attention import Attention
from omni_jax.layers.core import RMSNorm, param
from omni_jax.layers.mlp import GatedMLP
from omni_jax.layers.rope import cos_sin, rope_angles
from omni_jax.sampling import greedy as greedy_ids
from omni_jax.sampling import sample_logits


class DenseDecoderLayer(nnx.Module):
    """Pre-norm Qwen3 layer: x += attn(norm(x)); x += mlp(norm(x)). QK-norm GQA, SiLU-gated MLP."""

    def __init__(self, cfg: CodePredictorConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.self_attn = Attention(h, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                   eps=cfg.rms_norm_eps, use_bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.mlp = GatedMLP(h, cfg.intermediate_size, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache=None, cache_start=None):
        a, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_start)
        x = x + a
        return x + self.mlp(self.post_attention_layernorm(x)), new_cache


class StackedEmbed(nnx.Module):
    """G-1 embedding tables stacked: embedding [G-1, V, H]."""

    def __init__(self, num_tables: int, num: int, dim: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.embedding = param(rngs, (num_tables, num, dim), ("codebooks", "vocab", "embed"), dtype)

    def __call__(self, table, ids):
        """table: int (static or traced) scalar or int [...] broadcastable with ids; ids int [...] -> [..., H]."""
        return self.embedding[...][table, ids]


class StackedLinear(nnx.Module):
    """G-1 bias-free heads stacked: kernel [G-1, H, V]."""

    def __init__(self, num_heads: int, d_in: int, d_out: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = param(rngs, (num_heads, d_in, d_out), ("codebooks", "embed", "vocab"), dtype)

    def __call__(self, head, x):
        """head: int scalar (static or traced); x [..., H] -> [..., V]."""
        w = jax.lax.dynamic_index_in_dim(self.kernel[...], head, axis=0, keepdims=False)
        return jnp.einsum("...i,io->...o", x, w.astype(x.dtype))


class CodePredictorModel(nnx.Module):
    def __init__(self, cfg: CodePredictorConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.layers = nnx.List([DenseDecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.codec_embedding = StackedEmbed(cfg.num_code_groups - 1, cfg.vocab_size, cfg.hidden_size, dtype=dtype,
                                            rngs=rngs)

    def __call__(self, embeds, positions, mask, cache=None, cache_start=None):
        """embeds [B, T, H]; positions int [B, T] (plain 1-D RoPE); mask bool [B, T, S].

        cache: list of (k, v) [B, S, KV, D] per layer or None; cache_start int [B] or None (prefill from 0).
        Returns (final-normed hidden [B, T, H], new cache or None).
        """
        cfg = self.cfg
        with jax.named_scope("rope"):
            cos, sin = cos_sin(rope_angles(positions, cfg.head_dim, cfg.rope_theta), embeds.dtype)
        x = embeds
        new_cache = []
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                x, c = layer(x, cos, sin, mask, None if cache is None else cache[i], cache_start)
            new_cache.append(c)
        return self.norm(x), (new_cache if cache is not None else None)


class CodePredictor(nnx.Module):
    """model + lm_head (G-1 untied heads). See the module docstring for the per-frame schedule."""

    def __init__(self, cfg: CodePredictorConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.model = CodePredictorModel(cfg, dtype=dtype, rngs=rngs)
        self.lm_head = StackedLinear(cfg.num_code_groups - 1, cfg.hidden_size, cfg.vocab_size, dtype=dtype,
                                     rngs=rngs)

    @property
    def num_residual(self) -> int:
        return self.cfg.num_code_groups - 1

    def __call__(self, embeds, positions, mask, cache=None, cache_start=None):
        """Decoder only: see `CodePredictorModel.__call__`. Returns (hidden [B, T, H], new cache)."""
        return self.model(embeds, positions, mask, cache, cache_start)

    def head_logits(self, head, hidden):
        """lm_head[head] (codebook head+1): hidden [..., H] -> logits [..., V]."""
        return self.lm_head(head, hidden)

    def residual_embedding(self, codes: jnp.ndarray) -> jnp.ndarray:
        """codes int [B, G-1] (codebooks 1..G-1) -> Σ_g codec_embedding[g-1](codes[:, g-1]) [B, H]."""
        return jnp.sum(self.residual_embeddings(codes), axis=1)

    def residual_embeddings(self, codes: jnp.ndarray) -> jnp.ndarray:
        """codes int [B, G-1] -> per-codebook embeddings [B, G-1, H]."""
        tables = jnp.arange(self.num_residual)[None, :]
        return self.model.codec_embedding(tables, codes)

    def empty_cache(self, batch: int, dtype) -> list:
        """A KV cache for one frame: G positions (2 prefill rows + G-2 single steps)."""
        c = self.cfg
        shape = (batch, c.num_code_groups, c.num_key_value_heads, c.head_dim)
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(c.num_hidden_layers)]

    def predict_frame(self, h_last: jnp.ndarray, c0_embed: jnp.ndarray, *, greedy: bool = True,
                      rng: jax.Array | None = None, temperature: float = 1.0, top_k: int | None = 50,
                      top_p: float | None = 0.8, return_logits: bool = False, pick=None):
        """Residual codes of one frame, as HF's `code_predictor.generate(max_new_tokens=G-1)`.

        h_last [B, H]: the talker's final-normed hidden state at its last position; c0_embed [B, H]: the talker's
        `codec_embedding(c0)`. greedy=True -> argmax (HF do_sample=False); otherwise HF warpers with the given
        temperature / top_k / top_p (the talker passes top_k=50, top_p=0.8, temperature 1.0) and `rng`.
        pick: optional `(fp32 logits [B, V], step) -> ids [B]` replacing the greedy / warper choice (the serving
        engine's per-row sampling). Returns codes int32 [B, G-1] (and logits fp32 [B, G-1, V] when
        return_logits). Static shapes; the G-2
        single-token steps run in one `lax.scan` over a G-slot cache.
        """
        if pick is None and not greedy and rng is None:
            raise ValueError("predict_frame: sampling (greedy=False) needs an rng key")
        rng = jax.random.PRNGKey(0) if rng is None else rng
        b, _ = h_last.shape
        dtype = h_last.dtype
        g = self.cfg.num_code_groups
        slots = jnp.arange(g)

        custom = pick

        def pick(logits, step):
            logits = logits.astype(jnp.float32)  # HF generate samples from fp32 logits
            if custom is not None:
                return custom(logits, step)
            if greedy:
                return greedy_ids(logits)
            return sample_logits(logits, jax.random.fold_in(rng, step), temperature, top_k, top_p)

        with jax.named_scope("code_predictor_prefill"):
            x = jnp.stack([h_last, c0_embed.astype(dtype)], axis=1)  # [B, 2, H]
            pos = jnp.broadcast_to(jnp.arange(2, dtype=jnp.int32)[None], (b, 2))
            mask = jnp.tril(jnp.ones((2, 2), bool))[None]
            hidden, cache = self.model(x, pos, mask, cache=self.empty_cache(b, dtype))
            logits0 = self.head_logits(0, hidden[:, -1]).astype(jnp.float32)
            code0 = pick(logits0, 0)

        def step(carry, k):
            cache, code = carry
            x = self.model.codec_embedding(k - 1, code)[:, None, :].astype(dtype)  # [B, 1, H]
            p = jnp.full((b, 1), k + 1, jnp.int32)
            mask = jnp.broadcast_to((slots <= k + 1)[None, None, :], (b, 1, g))
            hidden, cache = self.model(x, p, mask, cache=cache, cache_start=jnp.full((b,), k + 1, jnp.int32))
            logits = self.head_logits(k, hidden[:, 0]).astype(jnp.float32)
            code = pick(logits, k)
            return (cache, code), (code, logits)

        with jax.named_scope("code_predictor_steps"):
            _, (codes, logits) = jax.lax.scan(step, (cache, code0), jnp.arange(1, g - 1, dtype=jnp.int32))
        codes = jnp.concatenate([code0[:, None], jnp.swapaxes(codes, 0, 1)], axis=1)
        if not return_logits:
            return codes
        return codes, jnp.concatenate([logits0[:, None], jnp.swapaxes(logits, 0, 1)], axis=1)

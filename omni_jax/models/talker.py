"""The Talker: a Qwen3-MoE codec decoder (every layer MoE + sigmoid-gated shared expert, interleaved M-RoPE)
that predicts codebook 0 of each speech frame, plus the code predictor for codebooks 1..G-1.

Attribute names mirror the checkpoint (`talker.model.layers.N...`, `talker.model.norm`,
`talker.model.codec_embedding`, `talker.codec_head`, `talker.{text,hidden}_projection.linear_fc{1,2}`,
`talker.code_predictor.*`); the key table is in omni_jax/checkpoint/keys_talker.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from omni_jax.config import TalkerConfig, TalkerTextConfig
from omni_jax.layers.core import Linear
from omni_jax.models.code_predictor import CodePredictor
from omni_jax.models.thinker import TextModel


class TalkerModel(TextModel):
    """The thinker's decoder stack with the input table named `codec_embedding` (Embedding(vocab, hidden)).

    The talker never embeds text ids: its inputs are sums of codec embeddings and projected thinker states, built
    by the caller. `TextModel.__call__` (embeds -> layers -> norm) is reused unchanged.
    """

    def __init__(self, cfg: TalkerTextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(cfg, dtype=dtype, rngs=rngs)
        self.codec_embedding = self.embed_tokens  # same [vocab, hidden] table, checkpoint name codec_embedding
        del self.embed_tokens


class ResizeMLP(nnx.Module):
    """linear_fc2(silu(linear_fc1(x))), both with bias: thinker_hidden -> intermediate -> talker hidden."""

    def __init__(self, d_in: int, inner: int, d_out: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.linear_fc1 = Linear(d_in, inner, ("embed", "mlp"), use_bias=True, dtype=dtype, rngs=rngs)
        self.linear_fc2 = Linear(inner, d_out, ("mlp", "embed"), use_bias=True, dtype=dtype, rngs=rngs)

    def __call__(self, x):
        """x: [..., thinker_hidden] -> [..., talker_hidden]."""
        return self.linear_fc2(jax.nn.silu(self.linear_fc1(x)))


class Talker(nnx.Module):
    """model (decoder) + codec_head (untied) + text/hidden projections + code_predictor."""

    def __init__(self, cfg: TalkerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        tc = cfg.text_config
        self.model = TalkerModel(tc, dtype=dtype, rngs=rngs)
        self.codec_head = Linear(tc.hidden_size, tc.vocab_size, ("embed", "vocab"), dtype=dtype, rngs=rngs)
        self.text_projection = ResizeMLP(cfg.thinker_hidden_size, tc.intermediate_size, tc.hidden_size,
                                         dtype=dtype, rngs=rngs)
        self.hidden_projection = ResizeMLP(cfg.thinker_hidden_size, tc.intermediate_size, tc.hidden_size,
                                           dtype=dtype, rngs=rngs)
        self.code_predictor = CodePredictor(cfg.code_predictor_config, dtype=dtype, rngs=rngs)

    def embed_codes(self, ids: jnp.ndarray) -> jnp.ndarray:
        """Codebook-0 / special codec ids int[...] -> embeddings [..., H] (`talker.model.codec_embedding`)."""
        return self.model.codec_embedding(ids)

    def __call__(self, embeds, positions, mask, cache=None, cache_start=None, moe_impl: str = "auto",
                 attention_impl: str = "auto", stacks: dict | None = None):
        """embeds [B, T, H]; positions int [3, B, T] (T, H, W axes; [B, T] = same on all axes); mask: AttentionMask
        (or bool [B, T, S] for the xla impl).

        cache: (k, v) of every layer [L, B, S, KV, D] or None; cache_start int [B] or None (prefill from 0);
        stacks: pre-stacked layer runs; all as in `TextModel`. Returns (logits [B, T, vocab] (codebook 0),
        final-normed hidden [B, T, H], new cache).
        The final-normed hidden state of the last position is what the code predictor receives (P12).
        """
        with jax.named_scope("talker_decoder"):
            hidden, new_cache, _ = self.model(embeds, positions, mask, cache, cache_start, moe_impl=moe_impl,
                                              attention_impl=attention_impl, stacks=stacks)
        with jax.named_scope("codec_head"):
            logits = self.codec_head(hidden)
        return logits, hidden, new_cache

    def next_frame_embedding(self, c0: jnp.ndarray, residual_codes: jnp.ndarray) -> jnp.ndarray:
        """Sum of all G codebook embeddings of a frame (P12), without the text track.

        c0 int [B] (codebook 0), residual_codes int [B, G-1] (codebooks 1..G-1) -> [B, H]. Summed over one stacked
        [B, G, H] axis, as the reference does (`codec_hiddens.sum(1)`).
        """
        parts = jnp.concatenate([self.embed_codes(c0)[:, None, :],
                                 self.code_predictor.residual_embeddings(residual_codes)], axis=1)
        return jnp.sum(parts, axis=1)

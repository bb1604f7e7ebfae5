"""The Thinker: Qwen3-MoE text decoder (QK-norm GQA, interleaved M-RoPE, MoE) with an untied lm_head.

Module attribute names follow the checkpoint's on-disk names (`thinker.model.layers.N.self_attn.q_proj`, ...),
so the key table in omni_jax/checkpoint/hf.py stays a short list of transforms.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx

from omni_jax.config import TextConfig, ThinkerConfig
from omni_jax.errors import OmniJaxError
from omni_jax.layers.attention import Attention
from omni_jax.layers.core import Embed, Linear, RMSNorm
from omni_jax.layers.mlp import GatedMLP, MoE
from omni_jax.layers.rope import cos_sin, rope_angles
from omni_jax.models.audio_encoder import AudioEncoder, packed_rows
from omni_jax.models.vision_encoder import VisionEncoder
from omni_jax.sharding import constrain

# jax.checkpoint policy for each scanned layer (training; see `layer_remat`): unset = no per-layer remat.
_UNSET = object()
_LAYER_REMAT: contextvars.ContextVar = contextvars.ContextVar("omni_jax_layer_remat", default=_UNSET)


@contextlib.contextmanager
def layer_remat(policy=None):
    """Within the block, every scanned decoder layer traced is wrapped in jax.checkpoint(policy=policy) (None:
    save only the layer's input): the backward pass keeps one [B, T, H] carry per layer instead of each layer's
    activations (the train step's `remat="layers"`)."""
    token = _LAYER_REMAT.set(policy)
    try:
        yield
    finally:
        _LAYER_REMAT.reset(token)


def _ranks(slots):
    """For a bool [B, L] mask: each slot's rank among all slots of the batch in row-major order."""
    flat = slots.reshape(-1).astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(flat) - 1, 0).reshape(slots.shape)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, layer_idx: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        h = cfg.hidden_size
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.self_attn = Attention(h, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim,
                                   eps=cfg.rms_norm_eps, use_bias=cfg.attention_bias, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        if self.is_moe:
            self.mlp = MoE(h, cfg.moe_intermediate_size, cfg.num_experts, cfg.num_experts_per_tok,
                           cfg.norm_topk_prob, cfg.shared_expert_intermediate_size, dtype=dtype, rngs=rngs)
        else:
            self.mlp = GatedMLP(h, cfg.intermediate_size, dtype=dtype, rngs=rngs)

    def __call__(self, x, cos, sin, mask, cache=None, cache_start=None, moe_impl="auto", attention_impl="auto",
                 layer_index=None):
        """cache: (k, v) of this layer [B, S, KV, D], or of all layers [L, B, S, KV, D] with `layer_index` (static
        int or traced) naming this layer's rows. Returns (x, new cache (same form), (probs, top_i, logits))."""
        a, new_cache = self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, cache_start, attention_impl,
                                      layer=layer_index)
        x = x + a
        if self.is_moe:
            m, probs, top_i, logits = self.mlp(self.post_attention_layernorm(x), impl=moe_impl, return_logits=True)
        else:
            m, probs, top_i, logits = self.mlp(self.post_attention_layernorm(x)), None, None, None
        return x + m, new_cache, (probs, top_i, logits)


class TextModel(nnx.Module):
    """embed_tokens -> layers -> norm. Shared by the thinker and (with a shared expert) the talker."""

    # Runs of at least this many identical layers run as one lax.scan (compile time of the 48-layer thinker; with a
    # KV cache too: `scan_runs`); shorter models stay unrolled (bf16 rounding then matches the reference's op
    # order). Per instance, or for every model built while it is patched here (tests force scanning with 2).
    scan_min_layers: int = 8

    def __init__(self, cfg: TextConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, i, dtype=dtype, rngs=rngs)
                                for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype, rngs=rngs)

    def scan_runs(self, deepstack_levels: int = 0, collect_hidden: tuple[int, ...] = ()) -> dict[int, int]:
        """{first: end} of the layer runs [first, end) to scan: the layers after those that receive DeepStack
        features, split where a collected hidden state is read (hidden[j] = output of layer j-1), grouped into
        runs of at least `scan_min_layers` layers of the same kind (MoE or dense). The rest run unrolled."""
        n = len(self.layers)
        cuts = {j for j in collect_hidden if 0 < j < n}
        runs, i = {}, deepstack_levels
        while i < n:
            j = i + 1
            while j < n and j not in cuts and self.layers[j].is_moe == self.layers[i].is_moe:
                j += 1
            if j - i >= max(2, self.scan_min_layers):
                runs[i] = j
            i = j
        return runs

    def _check_held(self, first: int, end: int):
        if any(not jax.tree.leaves(nnx.state(self.layers[j])) for j in range(first, end)):
            raise LayerRunError(f"decoder layers {first}..{end - 1} of this module were handed over to a serving "
                                "engine (their parameters live stacked there): run them through the engine, or "
                                "load the model again")

    def _scan(self, first: int, end: int, x, cos, sin, mask, moe_impl, attention_impl, cache=None,
              cache_start=None, stacked=None):
        """Layers [first, end) as one lax.scan over a stacked view of their parameters: `stacked` (from
        `stack_layer_runs`, kept by the serving engines) or built here at trace time (the checkpoint layout and
        the sharding rules stay per layer). The compiled module holds one layer body instead of end - first
        copies. With a KV cache (k, v) of [L, B, S, KV, D], the scan carries the whole cache and each layer
        writes its rows in place (dynamic_update_slice at its layer index). Returns (x, cache, per-layer router
        stats (probs, top_i, logits))."""
        if stacked is None:
            self._check_held(first, end)
        graphdef, state = nnx.split(self.layers[first])
        if stacked is None:
            states = [state] + [nnx.split(self.layers[j])[1] for j in range(first + 1, end)]
            stacked = jax.tree.map(lambda *a: jnp.stack(a), *states)

        def body(carry, xs):
            h, kv = carry
            layer_state, idx = xs
            layer = nnx.merge(graphdef, layer_state)
            h, kv, r = layer(h, cos, sin, mask, kv, cache_start, moe_impl, attention_impl, layer_index=idx)
            return (constrain(h, ("batch", "seq", None)), kv), r

        policy = _LAYER_REMAT.get()
        if policy is not _UNSET:
            body = jax.checkpoint(body, policy=policy, prevent_cse=False)
        (x, cache), rs = jax.lax.scan(body, (x, cache), (stacked, jnp.arange(first, end)))
        return x, cache, [tuple(None if a is None else a[k] for a in rs) for k in range(end - first)]

    def __call__(self, embeds, positions, mask, cache=None, cache_start=None, deepstack=None,
                 collect_hidden: tuple[int, ...] = (), moe_impl: str = "auto", attention_impl: str = "auto",
                 stacks: dict | None = None):
        """embeds [B, T, H]; positions int [3, B, T] (or [B, T]); mask: kernels.attention.AttentionMask (or bool
        [B, T, S] for the xla impl); attention_impl: the kernels.attention implementation.

        cache: None, or (k, v) of every layer stacked, [L, B, S, KV, D] each (`empty_cache` in
        omni_jax/serving/engine.py): unrolled layers index it statically, scanned runs carry it through the scan.
        deepstack: list of [B, T, H] tensors (zero outside visual positions) added to the outputs of the first
        len(deepstack) layers. collect_hidden: indices into the reference's `hidden_states` tuple (0 = embeddings,
        i = output of layer i-1 before DeepStack; the last index, num_hidden_layers, is the final normed output, as
        transformers ties it to last_hidden_state). stacks: {first: stacked parameters of layers [first, end)}
        from `stack_layer_runs` (the serving engines keep those runs stacked; the per-layer parameters of those
        layers are then unused): exactly these runs are scanned; without it, `scan_runs` picks them.
        Returns (final-normed hidden [B, T, H], new cache, stats): stats["hidden"] {i: ...}, stats["router"]
        [(probs, idx), ...] and stats["router_logits"] [raw router logits [B*T, E], ...] per layer ((None, None)
        and None for dense layers). The logits are a separate list so that (probs, idx) unpacking keeps working.
        moe_impl / attention_impl: kernels.moe / kernels.attention implementations ("auto": by target platform).
        """
        cfg = self.cfg
        with jax.named_scope("rope"):
            cos, sin = cos_sin(rope_angles(positions, cfg.head_dim, cfg.rope_theta, cfg.mrope_section), embeds.dtype)
        x = embeds
        hidden = {}
        if 0 in collect_hidden:
            hidden[0] = x
        router, router_logits = [], []
        levels = 0 if deepstack is None else len(deepstack)
        if stacks is None:
            scanned, stacks = self.scan_runs(levels, collect_hidden), {}
        else:
            scanned = {f: f + jax.tree.leaves(st)[0].shape[0] for f, st in stacks.items()}
            check_runs(scanned, levels, collect_hidden)
        i, n = 0, len(self.layers)
        while i < n:
            if i in scanned:  # a run of identical layers: one lax.scan over their stacked parameters
                end = scanned[i]
                with jax.named_scope(f"layers_{i}_{end - 1}"):
                    x, cache, per_layer = self._scan(i, end, x, cos, sin, mask, moe_impl, attention_impl, cache,
                                                     cache_start, stacks.get(i))
                router.extend(r[:2] for r in per_layer)
                router_logits.extend(r[2] for r in per_layer)
                i = end
            else:
                layer = self.layers[i]
                self._check_held(i, i + 1)
                with jax.named_scope(f"layer_{i}"):
                    x, cache, r = layer(x, cos, sin, mask, cache, cache_start, moe_impl, attention_impl,
                                        layer_index=None if cache is None else i)
                    x = constrain(x, ("batch", "seq", None))  # block boundary (no-op without an active mesh)
                router.append(r[:2])
                router_logits.append(r[2])
                i += 1
            if i in collect_hidden and i < n:  # hidden[n] is the normed output (below)
                hidden[i] = x
            if deepstack is not None and i - 1 < len(deepstack):
                x = x + deepstack[i - 1].astype(x.dtype)
        x = self.norm(x)
        if len(self.layers) in collect_hidden:
            hidden[len(self.layers)] = x
        stats = {"hidden": hidden, "router": router, "router_logits": router_logits}
        return x, cache, stats


class LayerRunError(OmniJaxError):
    """Pre-stacked layer runs that do not fit the call (DeepStack or a collected hidden state inside a run)."""


def check_runs(runs: dict[int, int], deepstack_levels: int, collect_hidden) -> None:
    for first, end in runs.items():
        inside = [j for j in collect_hidden if first < j < end]
        if first < deepstack_levels or inside:
            raise LayerRunError(f"scanned layers {first}..{end - 1} cannot take DeepStack features of "
                                f"{deepstack_levels} layers or return hidden states {inside}: build the engine's "
                                "layer stacks with those (stack_layer_runs / TextModel.scan_runs)")


def _layers(state):
    return state["model"]["layers"]


def split_layer_runs(state, runs: dict[int, int]):
    """A Thinker / Talker state (nnx.split) -> (the state with the parameters of the layers in `runs` set to None,
    {first: the per-layer states of [first, end)}). Works on arrays and on ShapeDtypeStructs."""
    state = jax.tree.map(lambda a: a, state)  # a new tree: the caller's state is not changed
    layers = _layers(state)
    per_run = {f: [layers[j] for j in range(f, e)] for f, e in runs.items()}
    for f, e in runs.items():
        for j in range(f, e):
            layers[j] = jax.tree.map(lambda a: None, layers[j])
    return state, per_run


def stack_layer_runs(state, runs: dict[int, int]):
    """(state without the run layers' parameters, {first: parameters of [first, end) stacked on a leading layer
    axis}) for `TextModel.__call__(stacks=...)`: the serving engines store the scanned runs stacked once, so no
    step copies the parameters (stacking at trace time would copy them every call). Call it under jit to place
    the stacks with the per-layer shardings (leading axis unsharded, see `stacked_shardings`)."""
    state, per_run = split_layer_runs(state, runs)
    return state, {f: jax.tree.map(lambda *a: jnp.stack(a), *states) for f, states in per_run.items()}


class Thinker(nnx.Module):
    """Text decoder + lm_head, with the audio and vision encoders attached when the config has them."""

    def __init__(self, cfg: ThinkerConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, with_encoders: bool = True):
        self.cfg = cfg
        self.model = TextModel(cfg.text_config, dtype=dtype, rngs=rngs)
        self.lm_head = Linear(cfg.text_config.hidden_size, cfg.text_config.vocab_size, ("embed", "vocab"),
                              dtype=dtype, rngs=rngs)
        self.audio_tower = AudioEncoder(cfg.audio_config, dtype=dtype, rngs=rngs) if with_encoders else None
        self.visual = VisionEncoder(cfg.vision_config, dtype=dtype, rngs=rngs) if with_encoders else None

    def embed(self, input_ids):
        return self.model.embed_tokens(input_ids)

    def input_embeddings(self, input_ids, *, audio=None, image=None, video=None, audio_conv_batch=None,
                         attention_impl: str = "auto"):
        """Token embeddings with encoder rows scattered into their placeholders (reference §2.5).

        input_ids int [B, L]. audio: (features [Na, mel, T], frame_lengths [Na]) for every audio of the batch in
        prompt order (encoded together, as the reference does). image / video: (pixel_values [P, C*T*p*p],
        grid_thw: static tuple of (t, h, w)). Returns (embeds [B, L, H], deepstack list of [B, L, H] or None):
        DeepStack features are placed at image/video positions (zeros elsewhere).
        The serving engine runs the same three stages as separate compiled calls (encoders per media shape, then
        `place_media` per prompt piece) so that their shapes do not multiply.
        """
        audio_rows = None
        if audio is not None:
            with jax.named_scope("audio_encoder"):
                tokens, lengths = self.audio_tower(*audio, conv_batch=audio_conv_batch, attn_impl=attention_impl)
            audio_rows = packed_rows(tokens, lengths)
        visual = {}
        for kind, inputs in (("image", image), ("video", video)):
            if inputs is not None:
                with jax.named_scope(f"vision_encoder_{kind}"):
                    visual[kind] = self.visual(*inputs, attention_impl=attention_impl)
        return self.place_media(input_ids, self.embed(input_ids), audio_rows=audio_rows, image=visual.get("image"),
                                video=visual.get("video"))

    def place_media(self, input_ids, x, *, audio_rows=None, image=None, video=None):
        """Encoder rows into the placeholders of token embeddings x [B, L, H] (input_ids int [B, L]).

        audio_rows [Ra, H]: the batch's audio tokens in placeholder order (row r fills the r-th `<|audio_pad|>` of
        the batch in row-major order: the reference's packed sequence). image / video: (rows [R, H], DeepStack
        levels [[R, H], ...]) in the same order for `<|image_pad|>` / `<|video_pad|>`. A table may hold more rows
        than placeholders (they are not read). Returns (embeds [B, L, H] in x's dtype, deepstack list of
        [B, L, H] (zeros outside visual positions) or None without image and video)."""
        cfg = self.cfg
        dtype = x.dtype

        def gather(table, token_id):
            slots = input_ids == token_id
            ranks = jnp.clip(_ranks(slots), 0, table.shape[0] - 1)
            return slots[..., None], ranks

        if audio_rows is not None:
            slots, ranks = gather(audio_rows, cfg.audio_token_id)
            x = jnp.where(slots, audio_rows[ranks].astype(dtype), x)
        deepstack = None
        for inputs, token_id in ((image, cfg.image_token_id), (video, cfg.video_token_id)):
            if inputs is None:
                continue
            rows, levels = inputs
            slots, ranks = gather(rows, token_id)
            x = jnp.where(slots, rows[ranks].astype(dtype), x)
            placed = [jnp.where(slots, lv[ranks].astype(dtype), 0) for lv in levels]
            deepstack = placed if deepstack is None else [a + b for a, b in zip(deepstack, placed)]
        return x, deepstack

    def logits(self, hidden):
        return self.lm_head(hidden)

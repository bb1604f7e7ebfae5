"""SiLU-gated MLPs: dense (code predictor, code2wav, shared expert) and the MoE block (thinker, talker)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from omni_jax.kernels.moe import expert_ffn
from omni_jax.layers.core import Linear, param


class GatedMLP(nnx.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden: int, inner: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.gate_proj = Linear(hidden, inner, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.up_proj = Linear(hidden, inner, ("embed", "mlp"), dtype=dtype, rngs=rngs)
        self.down_proj = Linear(inner, hidden, ("mlp", "embed"), dtype=dtype, rngs=rngs)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nnx.Module):
    """Linear router without bias; softmax over all experts in fp32, top-k, optional renormalisation."""

    def __init__(self, hidden: int, num_experts: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = param(rngs, (hidden, num_experts), ("embed", None), dtype)

    def __call__(self, x, top_k: int, norm_topk_prob: bool):
        logits = x @ self.kernel[...].astype(x.dtype)  # [N, E] in the activation dtype
        # fp32 on purpose (reference); float64 inputs stay float64 (exactness checks under jax_enable_x64)
        probs = jax.nn.softmax(logits.astype(jnp.promote_types(logits.dtype, jnp.float32)), axis=-1)
        top_w, top_i = jax.lax.top_k(probs, top_k)
        if norm_topk_prob:
            top_w = top_w / jnp.sum(top_w, axis=-1, keepdims=True)
        return logits, probs, top_w.astype(x.dtype), top_i


class Experts(nnx.Module):
    """Stacked expert weights in torch's Linear layout [out, in] per expert (as the checkpoints hold them):
    gate/up [E, I, H], down [E, H, I]. A decode step's matrix-vector products then read contiguous weight rows
    (kernels/moe/ref.py, docs/PERFORMANCE.md)."""

    def __init__(self, num_experts: int, hidden: int, inner: int, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.gate_proj = param(rngs, (num_experts, inner, hidden), ("experts", "expert_mlp", "expert_embed"), dtype)
        self.up_proj = param(rngs, (num_experts, inner, hidden), ("experts", "expert_mlp", "expert_embed"), dtype)
        self.down_proj = param(rngs, (num_experts, hidden, inner), ("experts", "expert_embed", "expert_mlp"), dtype)

    def __call__(self, x, idx, weights, impl: str = "auto"):
        return expert_ffn(x, idx, weights, self.gate_proj[...], self.up_proj[...], self.down_proj[...], impl=impl)


class MoE(nnx.Module):
    """Sparse MoE block; with `shared_inner > 0` adds the talker's sigmoid-gated shared expert.

    Returns (y, router_probs [N, E] fp32, top_i [N, K]) so training can form the load-balancing loss; with
    `return_logits` also the raw router logits [N, E] (activation dtype) for the router z-loss.
    """

    def __init__(self, hidden: int, inner: int, num_experts: int, top_k: int, norm_topk_prob: bool,
                 shared_inner: int = 0, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = Router(hidden, num_experts, dtype=dtype, rngs=rngs)
        self.experts = Experts(num_experts, hidden, inner, dtype=dtype, rngs=rngs)
        if shared_inner:
            self.shared_expert = GatedMLP(hidden, shared_inner, dtype=dtype, rngs=rngs)
            self.shared_expert_gate = Linear(hidden, 1, ("embed", None), dtype=dtype, rngs=rngs)
        else:
            self.shared_expert = None
            self.shared_expert_gate = None

    def __call__(self, x, impl: str = "auto", return_logits: bool = False):
        shape = x.shape
        xf = x.reshape(-1, shape[-1])
        logits, probs, top_w, top_i = self.gate(xf, self.top_k, self.norm_topk_prob)
        y = self.experts(xf, top_i, top_w, impl)
        if self.shared_expert is not None:
            y = y + jax.nn.sigmoid(self.shared_expert_gate(xf)) * self.shared_expert(xf)
        if return_logits:
            return y.reshape(shape), probs, top_i, logits
        return y.reshape(shape), probs, top_i

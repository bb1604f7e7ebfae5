"""Decoder self-attention: GQA with per-head QK RMSNorm before RoPE, and a functional KV cache."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from omni_jax.kernels.attention import attention
from omni_jax.layers.core import Linear, RMSNorm
from omni_jax.layers.rope import apply_rope


def write_cache(cache: jnp.ndarray, new: jnp.ndarray, start: jnp.ndarray | None, layer=None) -> jnp.ndarray:
    """cache [B, S, KV, D], new [B, T, KV, D], start int [B] (None: 0 for every row):
    cache[b, start[b]:start[b]+T] = new[b]. With `layer` (static int or traced scalar), cache is the stack of all
    layers [L, B, S, KV, D] and the rows of layer `layer` are written (in place: the stack is never copied).

    One shared offset (prefill, or a batch of one) is a single dynamic-update-slice, which XLA applies in place;
    per-row offsets are a scatter (without a layer axis a vmapped update: on CPU that costs two copies of the
    cache per layer and step)."""
    new = new.astype(cache.dtype)
    if layer is not None:
        if start is None or cache.shape[1] == 1:
            first = 0 if start is None else start[0]
            return jax.lax.dynamic_update_slice(cache, new[None], (layer, 0, first, 0, 0))
        b, t = new.shape[:2]
        cols = start[:, None] + jnp.arange(t)[None, :]
        return cache.at[layer, jnp.arange(b)[:, None], cols].set(new, mode="drop")
    if start is None:
        return jax.lax.dynamic_update_slice(cache, new, (0, 0, 0, 0))
    if cache.shape[0] == 1:
        return jax.lax.dynamic_update_slice(cache, new, (0, start[0], 0, 0))

    def one(c, n, s):
        return jax.lax.dynamic_update_slice(c, n, (s, 0, 0))

    return jax.vmap(one)(cache, new, start)


class Attention(nnx.Module):
    def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, *, qk_norm: bool = True,
                 eps: float = 1e-6, use_bias: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_proj = Linear(hidden, num_heads * head_dim, ("embed", "heads"), use_bias=use_bias, dtype=dtype,
                             rngs=rngs)
        self.k_proj = Linear(hidden, num_kv_heads * head_dim, ("embed", "kv_heads"), use_bias=use_bias,
                             dtype=dtype, rngs=rngs)
        self.v_proj = Linear(hidden, num_kv_heads * head_dim, ("embed", "kv_heads"), use_bias=use_bias,
                             dtype=dtype, rngs=rngs)
        self.o_proj = Linear(num_heads * head_dim, hidden, ("heads", "embed"), use_bias=use_bias, dtype=dtype,
                             rngs=rngs)
        self.q_norm = RMSNorm(head_dim, eps, dtype=dtype, rngs=rngs) if qk_norm else None
        self.k_norm = RMSNorm(head_dim, eps, dtype=dtype, rngs=rngs) if qk_norm else None

    def __call__(self, x, cos, sin, mask, cache=None, cache_start=None, impl: str = "auto", layer=None):
        """x [B, T, hidden]; cos/sin [B, T, D]; mask: an AttentionMask (or bool [B, T, S] for the xla impl);
        impl: the kernels.attention implementation.

        Without a cache, attends over the T new tokens (S == T). With `cache=(k, v)` of [B, S, KV, D], writes
        the new keys/values at `cache_start` [B] and attends over the whole cache (S = cache length); if
        `cache_start` is None the new tokens start at 0 and attention runs over the T new tokens only (prefill).
        With `layer` (static int or traced scalar), cache is (k, v) of every layer [L, B, S, KV, D]: this layer's
        rows are written in place and read at index `layer`. Returns (out [B, T, hidden], new cache or None).
        """
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        new_cache = None
        keys, values = k, v
        if cache is not None:
            ck, cv = cache
            ck, cv = write_cache(ck, k, cache_start, layer), write_cache(cv, v, cache_start, layer)
            new_cache = (ck, cv)
            if cache_start is not None:
                keys, values = ck, cv
        out = attention(q, keys, values, mask, scale=self.head_dim ** -0.5, impl=impl,
                        layer=layer if keys is not k else None)
        return self.o_proj(out.reshape(b, t, self.num_heads * self.head_dim)), new_cache

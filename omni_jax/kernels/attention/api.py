"""The one attention entry point the models call: `attention(q, k, v, mask, scale=..., impl=...)`.

Implementations (`IMPLS`):
  xla     the pure-JAX reference (ref.attention_ref): builds the [B, T, S] boolean from the mask spec.
  live    XLA, online softmax over the live key range only (ref.attention_live): decode / inference, no VJP.
  splash  TPU: jax's Pallas splash attention (splash.py); forward and backward. Masks with a per-row (traced)
          q_offset (decode, chunked prefill) take the `live` path: splash masks are static.
  flash   GPU: our Pallas flash attention with the Triton lowering (flash_gpu.py); forward and backward.
  cudnn   GPU: jax.nn.dot_product_attention(implementation="cudnn"): causal / sliding window, bf16/fp16, no
          segment ids, no kv_lengths, q_offset 0.
  decode  GPU: our Pallas split-K flash-decoding kernel over the KV cache (decode_gpu.py), reading only each
          row's live length; inference only.
  auto    by the target platform (kernels.platform.platform_of: the mesh's devices, not the default backend):
          TPU -> splash (decode -> live); GPU -> flash (decode -> decode); CPU -> xla. Tiny attentions (fewer
          than 128 keys, e.g. the code predictor's 16-slot cache) stay on xla everywhere: a kernel launch and
          block padding cost more than they save there.

On a CPU target the Pallas implementations run in interpret mode (slow; for tests and `--attention-impl splash`
on this machine). Under an active mesh with more than one device the Pallas implementations run inside a
`jax.shard_map` over the batch and head axes of the sharding rules (attention itself needs no collective).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from omni_jax.kernels.attention.mask import AttentionMask, AttentionMaskError
from omni_jax.kernels.attention.ref import attention_live, attention_ref
from omni_jax.kernels.platform import interpret_for, platform_of

IMPLS = ("auto", "xla", "live", "splash", "flash", "cudnn", "decode")
PALLAS_IMPLS = ("splash", "flash", "decode")
SMALL_KV = 128  # below this many keys, `auto` keeps the XLA path
_HOME = {"splash": "tpu", "flash": "gpu", "cudnn": "gpu", "decode": "gpu"}  # where each kernel compiles
_FOR = {"tpu": ("xla", "live", "splash"), "gpu": ("xla", "live", "flash", "cudnn", "decode"),
        "cpu": ("xla", "live", "splash", "flash", "decode")}


class AttentionImplError(AttentionMaskError):
    """An unknown attention implementation, or one that cannot run this call."""


def check_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise AttentionImplError(f"unknown attention implementation {impl!r}; available: {', '.join(IMPLS)}")
    return impl


def _is_decode(t: int, mask: AttentionMask) -> bool:
    return t <= 16 and not mask.static_offset


def choose_impl(impl: str, t: int, s: int, mask, platform: str) -> str:
    """The implementation `attention` runs for this call (resolves `auto`)."""
    check_impl(impl)
    if not isinstance(mask, AttentionMask):
        if impl not in ("auto", "xla"):
            raise AttentionImplError(f"attention impl {impl!r} needs an AttentionMask (masks as data), not a "
                                     "boolean array; only 'xla' takes a materialised mask")
        return "xla"
    if impl != "auto":
        home = _HOME.get(impl)
        if home is not None and platform not in ((home,) if impl == "cudnn" else (home, "cpu")):
            raise AttentionImplError(f"attention impl {impl!r} is a {home.upper()} kernel (Pallas ones also run "
                                     f"interpreted on CPU); the target platform is {platform}: use 'auto' or one "
                                     f"of {', '.join(_FOR[platform])}")
        if impl == "decode" and t > 16:
            raise AttentionImplError(f"attention impl 'decode' takes at most 16 new tokens per row, got {t}: use "
                                     "'flash' (or 'auto')")
        return impl
    if s < SMALL_KV or platform == "cpu":
        return "xla"
    if platform == "tpu":
        return "live" if _is_decode(t, mask) else "splash"
    if platform == "gpu":
        return "decode" if _is_decode(t, mask) else "flash"
    return "xla"


def attention(q, k, v, mask: AttentionMask | jax.Array, *, scale: float, impl: str = "auto", mesh=None,
              layer=None):
    """q: [B, T, H, D], k/v: [B, S, KV, D] (H a multiple of KV), mask: AttentionMask (or, for `xla` only, a bool
    array broadcastable to [B, T, S]). Returns [B, T, H, Dv] in q's dtype. `mesh` names the target devices for
    `auto` (default: the current mesh, see kernels.platform).

    layer: k/v are a KV cache of every layer [L, B, S, KV, D] and layer `layer` (static int or traced scalar) is
    attended: `live` reads its chunks from the stack in place; the other implementations take the layer's slice.
    k/v are cast to q's dtype where they are read."""
    b, t, h, _ = q.shape
    kshape = k.shape if layer is None else k.shape[1:]
    s, kvh = kshape[1], kshape[2]
    if h % kvh:
        raise AttentionMaskError(f"attention: {h} query heads is not a multiple of {kvh} key/value heads")
    if kshape[0] != b or v.shape[:k.ndim - 1] != k.shape[:-1]:
        raise AttentionMaskError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not fit together")
    platform = platform_of(mesh)
    chosen = choose_impl(impl, t, s, mask, platform)
    if isinstance(mask, AttentionMask):
        mask.check(b, t, s)
    live = chosen == "live" or (chosen == "splash" and not mask.static_offset)
    if live:
        return attention_live(q, k, v, mask, scale, layer=layer)
    if layer is not None:
        k, v = (jax.lax.dynamic_index_in_dim(a, layer, 0, keepdims=False) for a in (k, v))
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if chosen == "xla":
        return attention_ref(q, k, v, mask, scale)
    if chosen == "cudnn":
        return _cudnn(q, k, v, mask, scale)
    interpret = interpret_for(platform)
    if chosen == "splash":
        from omni_jax.kernels.attention.splash import splash_attention
        fn = splash_attention
    elif chosen == "flash":
        from omni_jax.kernels.attention.flash_gpu import flash_attention
        fn = flash_attention
    else:
        from omni_jax.kernels.attention.decode_gpu import decode_attention
        fn = decode_attention
    return _on_mesh(lambda q, k, v, m: fn(q, k, v, m, scale, interpret=interpret), q, k, v, mask)


def _cudnn(q, k, v, mask: AttentionMask, scale: float):
    if mask.has_segments or mask.kv_lengths is not None or not mask.static_offset or mask.q_offset != 0:
        raise AttentionImplError("attention impl 'cudnn' covers causal / sliding-window masks only (no segment ids, "
                                 "kv_lengths or q_offset); use 'flash'")
    window = None if mask.window is None else (mask.window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=mask.causal, local_window_size=window,
                                        implementation="cudnn")


def _on_mesh(fn, q, k, v, mask: AttentionMask):
    """Run fn inside a shard_map over batch and heads when a multi-device mesh is active; else call it."""
    from omni_jax.sharding import active_mesh, current_rules, logical_to_spec

    mesh = active_mesh()
    if mesh is None or math.prod(dict(mesh.shape).values()) == 1:
        return fn(q, k, v, mask)
    rules = current_rules()
    b, h, kvh = q.shape[0], q.shape[2], k.shape[2]
    batch = logical_to_spec(("batch",), rules, mesh, (b,))[0]
    heads = logical_to_spec(("heads",), rules, mesh, (h,))[0]
    if heads is not None and logical_to_spec(("heads",), rules, mesh, (kvh,))[0] != heads:
        heads = None  # split q and kv heads over the same axes or not at all (keeps the GQA grouping)
    if heads is not None and batch is not None:
        used = set(heads if isinstance(heads, tuple) else (heads,))
        if used & set(batch if isinstance(batch, tuple) else (batch,)):
            heads = None
    P = jax.sharding.PartitionSpec
    qkv_spec = P(batch, None, heads, None)
    leaves, treedef = jax.tree.flatten(mask)

    def leaf_spec(x):
        if jnp.ndim(x) == 0 or jnp.shape(x)[0] != b or b == 1:
            return P()
        return P(batch, *([None] * (jnp.ndim(x) - 1)))

    def body(q, k, v, *leaves):
        return fn(q, k, v, jax.tree.unflatten(treedef, leaves))

    return jax.shard_map(body, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, *map(leaf_spec, leaves)),
                         out_specs=qkv_spec, check_vma=False)(q, k, v, *leaves)

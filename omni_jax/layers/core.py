"""Parameters with logical axes, Linear, Embed, RMSNorm, LayerNorm, activations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs | None, shape, axes: tuple[str | None, ...], dtype=jnp.float32, init: str = "normal",
          scale: float = 0.02) -> nnx.Param:
    """Create a weight with its logical axes recorded as metadata (see omni_jax/sharding.py).

    `init`: "normal" (std=scale), "zeros", "ones". Checkpoint loading overwrites values, so the init only matters
    for fresh models (`omni-jax init`, training from scratch).
    """
    shape = tuple(shape)
    if len(axes) != len(shape):
        raise ValueError(f"param of shape {shape} given {len(axes)} logical axes {axes}")
    if init == "zeros":
        value = jnp.zeros(shape, dtype)
    elif init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "normal":
        value = (scale * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    else:
        raise ValueError(f"unknown init {init!r}")
    return nnx.Param(value, logical_axes=tuple(axes))


class Linear(nnx.Module):
    """y = x @ kernel + bias, kernel stored [in, out] (a torch weight [out, in] transposed)."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str | None, str | None], *, use_bias: bool = False,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.kernel = param(rngs, (d_in, d_out), axes, dtype)
        self.bias = param(rngs, (d_out,), (axes[1],), dtype, init="zeros") if use_bias else None

    def __call__(self, x):
        y = jnp.einsum("...i,io->...o", x, self.kernel[...].astype(x.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(x.dtype)
        return y


class Embed(nnx.Module):
    def __init__(self, num: int, dim: int, axes=("vocab", "embed"), *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.embedding = param(rngs, (num, dim), axes, dtype)

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0)


class RMSNorm(nnx.Module):
    """Qwen RMSNorm: normalise in fp32 (float64 for float64 inputs), cast back to the input dtype, then multiply
    by the weight."""

    def __init__(self, dim: int, eps: float = 1e-6, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.weight = param(rngs, (dim,), ("norm",), dtype, init="ones")
        self.eps = eps

    def __call__(self, x):
        xf = x.astype(jnp.promote_types(x.dtype, jnp.float32))  # bf16/fp32 -> fp32 (as the reference)
        y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(x.dtype) * y.astype(x.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm semantics (biased variance), statistics in fp32."""

    def __init__(self, dim: int, eps: float = 1e-5, *, dtype=jnp.float32, rngs: nnx.Rngs | None = None):
        self.weight = param(rngs, (dim,), ("norm",), dtype, init="ones")
        self.bias = param(rngs, (dim,), ("norm",), dtype, init="zeros")
        self.eps = eps

    def __call__(self, x):
        ct = jnp.promote_types(x.dtype, jnp.float32)  # fp32 statistics for bf16/fp32; fp64 stays fp64
        xf = x.astype(ct)
        mu = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mu), axis=-1, keepdims=True)
        y = (xf - mu) * jax.lax.rsqrt(var + self.eps)
        y = y * self.weight[...].astype(ct) + self.bias[...].astype(ct)
        return y.astype(x.dtype)


def gelu_exact(x):
    return jax.nn.gelu(x, approximate=False)


def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def silu(x):
    return jax.nn.silu(x)


"""Rotary position embeddings: plain 1-D RoPE and Qwen3-Omni's interleaved 3-axis M-RoPE (TM-RoPE).

Angles are computed in fp32 and cast to the activation dtype only when applied (as the reference does).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def inv_frequencies(head_dim: int, theta: float) -> jnp.ndarray:
    """inv_freq[j] = theta ** (-2j / head_dim), j < head_dim/2, fp32."""
    return 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))


def mrope_axis_of_slot(head_dim: int, mrope_section) -> np.ndarray:
    """For each of the head_dim/2 frequency slots, which position axis (0=T, 1=H, 2=W) feeds it.

    Interleaved layout: slot j takes H when j % 3 == 1 and j < 3*section[1], W when j % 3 == 2 and
    j < 3*section[2], T otherwise (the `interleaved` config flag is ignored by the reference: always interleaved).
    """
    half = head_dim // 2
    axis = np.zeros(half, np.int32)
    for a, offset in ((1, 1), (2, 2)):
        axis[offset:3 * mrope_section[a]:3] = a
    return axis


def rope_angles(positions: jnp.ndarray, head_dim: int, theta: float, mrope_section=None) -> jnp.ndarray:
    """Rotation angles [B, L, head_dim] (fp32) for positions [B, L] (1-D) or [3, B, L] (T, H, W)."""
    inv = inv_frequencies(head_dim, theta)
    pos = positions.astype(jnp.float32)
    if pos.ndim == 2:
        freqs = pos[..., None] * inv  # [B, L, D/2]
    else:
        if mrope_section is None:
            raise ValueError("3-axis positions need an mrope_section")
        per_axis = pos[..., None] * inv  # [3, B, L, D/2]
        axis = jnp.asarray(mrope_axis_of_slot(head_dim, mrope_section))
        freqs = jnp.where(axis == 0, per_axis[0], jnp.where(axis == 1, per_axis[1], per_axis[2]))
    return jnp.concatenate([freqs, freqs], axis=-1)


def cos_sin(angles: jnp.ndarray, dtype) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos/sin of fp32 angles, cast to the activation dtype."""
    return jnp.cos(angles).astype(dtype), jnp.sin(angles).astype(dtype)


def rotate_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """x: [B, L, H, D]; cos/sin: [B, L, D] (broadcast over heads)."""
    return x * cos[:, :, None, :] + rotate_half(x) * sin[:, :, None, :]

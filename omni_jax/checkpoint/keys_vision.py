"""Key-table rules for the vision part (HF on-disk name <-> omni_jax path). See checkpoint/keys.py.

Our module (models/vision_encoder.py) mirrors `thinker.visual.*` name for name, with two storage choices:
- `patch_embed.proj.weight` (torch Conv3d [hidden, C, T, P, P]) is kept 5-D as `patch_embed.proj.kernel`
  [C, T, P, P, hidden] (output axis moved last) under the transform "conv3d_patch" registered here. Unlike
  keys.py's "conv3d_linear" (flattened [C*T*P*P, hidden], no inverse), it inverts without knowing the patch shape.
- the merger MLPs are `nnx.List`s [Linear, GELU, Linear] like the reference's ModuleList, so
  `merger.mlp.{0,2}` and `merger_list.J.mlp.{0,2}` keep their indices; `.weight` -> `.kernel` (transposed).
"""

import numpy as np

from omni_jax.checkpoint.keys import Rule, Transform, register_transform

register_transform("conv3d_patch", Transform(
    to_jax=lambda x: np.ascontiguousarray(np.moveaxis(x, 0, -1)),
    to_hf=lambda x: np.ascontiguousarray(np.moveaxis(x, -1, 0)),
    jax_shape=lambda s: tuple(s[1:]) + (s[0],),
))

_V = "thinker.visual"
_B = f"{_V}.blocks.{{l:\\d+}}"
_OB = f"{_V}.blocks.{{l}}"
_M = "{m:merger|merger_list\\.\\d+}"  # the final merger and each DeepStack merger share one layout

RULES: list = [
    Rule(f"{_V}.patch_embed.proj.weight", f"{_V}.patch_embed.proj.kernel", "conv3d_patch"),
    Rule(f"{_V}.patch_embed.proj.bias", f"{_V}.patch_embed.proj.bias"),
    Rule(f"{_V}.pos_embed.weight", f"{_V}.pos_embed.embedding"),
    Rule(f"{_B}.{{n:norm1|norm2}}.{{p:weight|bias}}", f"{_OB}.{{n}}.{{p}}"),
    Rule(f"{_B}.attn.{{p:qkv|proj}}.weight", f"{_OB}.attn.{{p}}.kernel", "T"),
    Rule(f"{_B}.attn.{{p:qkv|proj}}.bias", f"{_OB}.attn.{{p}}.bias"),
    Rule(f"{_B}.mlp.{{p:linear_fc1|linear_fc2}}.weight", f"{_OB}.mlp.{{p}}.kernel", "T"),
    Rule(f"{_B}.mlp.{{p:linear_fc1|linear_fc2}}.bias", f"{_OB}.mlp.{{p}}.bias"),
    Rule(f"{_V}.{_M}.ln_q.{{p:weight|bias}}", f"{_V}.{{m}}.ln_q.{{p}}"),
    Rule(f"{_V}.{_M}.mlp.{{i:0|2}}.weight", f"{_V}.{{m}}.mlp.{{i}}.kernel", "T"),
    Rule(f"{_V}.{_M}.mlp.{{i:0|2}}.bias", f"{_V}.{{m}}.mlp.{{i}}.bias"),
]

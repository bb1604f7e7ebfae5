"""Key-table rules for the audio part (HF on-disk name <-> omni_jax path). See checkpoint/keys.py.

The audio tower (omni_jax.models.audio_encoder.AudioEncoder) sits at `thinker.audio_tower` in our tree, the
same path as on disk (transformers keeps it in memory at `thinker.model.audio_tower`, see HF_MEMORY_ALIASES).
"""

from omni_jax.checkpoint.keys import Rule

_H = "thinker.audio_tower"
_L = f"{_H}.layers.{{l:\\d+}}"
_O = f"{_H}.layers.{{l}}"

RULES: list = [
    # conv stem: torch Conv2d [out, in, kh, kw] -> HWIO
    Rule(f"{_H}.{{c:conv2d[123]}}.weight", f"{_H}.{{c}}.kernel", "conv2d"),
    Rule(f"{_H}.{{c:conv2d[123]}}.bias", f"{_H}.{{c}}.bias"),
    Rule(f"{_H}.conv_out.weight", f"{_H}.conv_out.kernel", "T"),  # no bias
    # transformer layers
    Rule(f"{_L}.self_attn.{{p:[qkv]_proj|out_proj}}.weight", f"{_O}.self_attn.{{p}}.kernel", "T"),
    Rule(f"{_L}.self_attn.{{p:[qkv]_proj|out_proj}}.bias", f"{_O}.self_attn.{{p}}.bias"),
    Rule(f"{_L}.{{n:self_attn_layer_norm|final_layer_norm}}.{{w:weight|bias}}", f"{_O}.{{n}}.{{w}}"),
    Rule(f"{_L}.{{p:fc1|fc2}}.weight", f"{_O}.{{p}}.kernel", "T"),
    Rule(f"{_L}.{{p:fc1|fc2}}.bias", f"{_O}.{{p}}.bias"),
    # output head
    Rule(f"{_H}.ln_post.{{w:weight|bias}}", f"{_H}.ln_post.{{w}}"),
    Rule(f"{_H}.{{p:proj1|proj2}}.weight", f"{_H}.{{p}}.kernel", "T"),
    Rule(f"{_H}.{{p:proj1|proj2}}.bias", f"{_H}.{{p}}.bias"),
]

"""The key table: HF checkpoint names <-> omni_jax parameter paths, with the tensor transform for each.

A rule is two templates with `{name}` placeholders (each matching one dotted component) and a transform name.
A placeholder that appears only in the HF template is a *stack* index: the per-item HF tensors (e.g. one per
expert) fill slices along axis 0 of one omni_jax parameter. Every part of the model registers its rules in
`RULES` below; import and export both run off this one list and fail loudly on anything unmapped.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transform:
    """to_jax: HF tensor -> omni_jax value; to_hf: the inverse. Both act on numpy arrays."""

    to_jax: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]
    jax_shape: Callable[[tuple], tuple]  # HF shape -> omni_jax shape (for shape checks before any copy)


def _t2(x):
    return np.ascontiguousarray(np.swapaxes(x, -1, -2))


TRANSFORMS: dict[str, Transform] = {
    "id": Transform(lambda x: x, lambda x: x, lambda s: tuple(s)),
    # torch Linear weight [out, in] <-> kernel [in, out]
    "T": Transform(_t2, _t2, lambda s: tuple(s[:-2]) + (s[-1], s[-2])),
    # torch Conv1d weight [out, in, k] <-> [k, in, out] (lax.conv_general_dilated with 'WIO')
    "conv1d": Transform(lambda x: np.ascontiguousarray(np.transpose(x, (2, 1, 0))),
                        lambda x: np.ascontiguousarray(np.transpose(x, (2, 1, 0))), lambda s: (s[2], s[1], s[0])),
    # torch Conv2d weight [out, in, kh, kw] <-> [kh, kw, in, out] ('HWIO')
    "conv2d": Transform(lambda x: np.ascontiguousarray(np.transpose(x, (2, 3, 1, 0))),
                        lambda x: np.ascontiguousarray(np.transpose(x, (3, 2, 0, 1))),
                        lambda s: (s[2], s[3], s[1], s[0])),
    # torch ConvTranspose1d weight [in, out, k] <-> [k, in, out]
    "convT1d": Transform(lambda x: np.ascontiguousarray(np.transpose(x, (2, 0, 1))),
                         lambda x: np.ascontiguousarray(np.transpose(x, (1, 2, 0))), lambda s: (s[2], s[0], s[1])),
    # torch Conv3d patch embedding [out, C, T, P, P] <-> linear kernel [C*T*P*P, out]
    "conv3d_linear": Transform(lambda x: np.ascontiguousarray(x.reshape(x.shape[0], -1).T),
                               None, lambda s: (int(np.prod(s[1:])), s[0])),
}


@dataclasses.dataclass(frozen=True)
class Rule:
    hf: str
    ours: str
    transform: str = "id"
    # Full HF shape for transforms that cannot be inverted from the omni_jax shape alone (conv3d_linear).
    hf_shape_hint: str | None = None

    @staticmethod
    @functools.cache
    def _regex(template: str) -> re.Pattern:
        out, pos = [], 0
        for m in PLACEHOLDER.finditer(template):
            out.append(re.escape(template[pos:m.start()]))
            out.append(f"(?P<{m.group(1)}>{m.group(2) or '[^.]+'})")
            pos = m.end()
        out.append(re.escape(template[pos:]))
        return re.compile("^" + "".join(out) + "$")

    def format_ours(self, groups: dict) -> str:
        return fill(self.ours, groups)

    def format_hf(self, groups: dict) -> str:
        return fill(self.hf, groups)

    @property
    def hf_re(self):
        return self._regex(self.hf)

    @property
    def ours_re(self):
        # A placeholder constrained in the HF template (e.g. `{p:decoder\.\d+}`, which may span dots) keeps that
        # constraint on our side, so export matches exactly the paths import produces.
        constraints = {m.group(1): m.group(2) for m in PLACEHOLDER.finditer(self.hf) if m.group(2)}
        def constrained(m):
            return "{" + m.group(1) + ":" + (m.group(2) or constraints.get(m.group(1), "[^.]+")) + "}"

        ours = PLACEHOLDER.sub(constrained, self.ours)
        return self._regex(ours)

    @property
    def stack_names(self) -> tuple[str, ...]:
        ours = {m.group(1) for m in PLACEHOLDER.finditer(self.ours)}
        return tuple(m.group(1) for m in PLACEHOLDER.finditer(self.hf) if m.group(1) not in ours)


# `{name}` matches one dotted component; `{name:regex}` restricts it (e.g. `{p:q_proj|k_proj}`).
PLACEHOLDER = re.compile(r"\{(\w+)(?::([^}]+))?\}")


def fill(template: str, groups: dict) -> str:
    return PLACEHOLDER.sub(lambda m: str(groups[m.group(1)]), template)


def register_transform(name: str, t: Transform):
    if name in TRANSFORMS and TRANSFORMS[name] is not t:
        raise ValueError(f"transform {name!r} already registered")
    TRANSFORMS[name] = t


# ---------------------------------------------------------------------------------------------------------------
# Rules, part by part. Order matters only for readability; patterns must not overlap.

def decoder_rules(hf_root: str, ours_root: str) -> list[Rule]:
    """A Qwen3-MoE decoder (thinker LM at thinker.model, talker LM at talker.model)."""
    h, o = f"{hf_root}.layers.{{l:\\d+}}", f"{ours_root}.layers.{{l}}"
    return [
        Rule(f"{hf_root}.embed_tokens.weight", f"{ours_root}.embed_tokens.embedding"),
        Rule(f"{hf_root}.norm.weight", f"{ours_root}.norm.weight"),
        Rule(f"{h}.input_layernorm.weight", f"{o}.input_layernorm.weight"),
        Rule(f"{h}.post_attention_layernorm.weight", f"{o}.post_attention_layernorm.weight"),
        Rule(f"{h}.self_attn.{{p:[qkvo]_proj}}.weight", f"{o}.self_attn.{{p}}.kernel", "T"),
        Rule(f"{h}.self_attn.{{p:[qkvo]_proj}}.bias", f"{o}.self_attn.{{p}}.bias"),
        Rule(f"{h}.self_attn.q_norm.weight", f"{o}.self_attn.q_norm.weight"),
        Rule(f"{h}.self_attn.k_norm.weight", f"{o}.self_attn.k_norm.weight"),
        Rule(f"{h}.mlp.gate.weight", f"{o}.mlp.gate.kernel", "T"),
        # experts keep torch's [out, in] layout (stacked along axis 0): no transpose
        Rule(f"{h}.mlp.experts.{{e:\\d+}}.{{p:gate_proj|up_proj|down_proj}}.weight", f"{o}.mlp.experts.{{p}}"),
        Rule(f"{h}.mlp.shared_expert.{{p:gate_proj|up_proj|down_proj}}.weight",
             f"{o}.mlp.shared_expert.{{p}}.kernel", "T"),
        Rule(f"{h}.mlp.shared_expert_gate.weight", f"{o}.mlp.shared_expert_gate.kernel", "T"),
        # dense MLP layers (mlp_only_layers)
        Rule(f"{h}.mlp.{{p:gate_proj|up_proj|down_proj}}.weight", f"{o}.mlp.{{p}}.kernel", "T"),
    ]


THINKER_RULES = decoder_rules("thinker.model", "thinker.model") + [
    Rule("thinker.lm_head.weight", "thinker.lm_head.kernel", "T"),
]



def all_rules() -> list[Rule]:
    """The whole key table: thinker LM here, each other part's rules in its own keys_<part>.py module."""
    from omni_jax.checkpoint import keys_audio, keys_code2wav, keys_talker, keys_vision

    return [*THINKER_RULES, *keys_audio.RULES, *keys_vision.RULES, *keys_talker.RULES, *keys_code2wav.RULES]


# transformers' in-memory names (used by its `state_dict()` and, in some versions, on disk).
HF_MEMORY_ALIASES = (
    (re.compile(r"^thinker\.model\.audio_tower\."), "thinker.audio_tower."),
    (re.compile(r"^thinker\.model\.visual\."), "thinker.visual."),
    (re.compile(r"^thinker\.model\.language_model\."), "thinker.model."),
)


def canonical_hf_key(key: str) -> str:
    """Map transformers' in-memory names onto the released on-disk names."""
    for pat, repl in HF_MEMORY_ALIASES:
        if pat.match(key):
            return pat.sub(repl, key, count=1)
    return key


FUSED_EXPERTS = re.compile(r"^(?P<pre>.*\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def split_fused_experts(key: str, value: np.ndarray):
    """transformers' fused experts ([E, 2I, H] gate_up, [E, H, I] down) -> per-expert on-disk tensors."""
    m = FUSED_EXPERTS.match(key)
    if not m:
        return None
    pre = m.group("pre")
    out = {}
    if m.group("kind") == "gate_up_proj":
        inner = value.shape[1] // 2
        for e in range(value.shape[0]):
            out[f"{pre}.{e}.gate_proj.weight"] = value[e, :inner]
            out[f"{pre}.{e}.up_proj.weight"] = value[e, inner:]
    else:
        for e in range(value.shape[0]):
            out[f"{pre}.{e}.down_proj.weight"] = value[e]
    return out


def match(key: str, rules=None):
    """(rule, groups) for an HF key, or (None, None)."""
    for r in rules if rules is not None else all_rules():
        m = r.hf_re.match(key)
        if m:
            return r, m.groupdict()
    return None, None

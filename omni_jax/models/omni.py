"""The composed Qwen3-Omni model: thinker (+ encoders), and for speech output the talker and code2wav."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from omni_jax.config import OmniConfig
from omni_jax.models.thinker import Thinker

ALL_PARTS = ("thinker", "talker", "code2wav")


def default_parts(cfg: OmniConfig) -> tuple[str, ...]:
    return ALL_PARTS if cfg.enable_audio_output else ("thinker",)


class OmniModel(nnx.Module):
    """Attribute names match the checkpoint's top-level prefixes (`thinker.`, `talker.`, `code2wav.`)."""

    def __init__(self, cfg: OmniConfig, *, dtype=jnp.float32, rngs: nnx.Rngs, parts: tuple[str, ...] | None = None):
        parts = default_parts(cfg) if parts is None else tuple(parts)
        unknown = set(parts) - set(ALL_PARTS)
        if unknown:
            raise ValueError(f"unknown model parts {sorted(unknown)}; choose from {ALL_PARTS}")
        if ("talker" in parts or "code2wav" in parts) and not cfg.enable_audio_output:
            raise ValueError("this config has enable_audio_output=false: it has no talker / code2wav")
        self.cfg = cfg
        self.parts = parts
        self.thinker = Thinker(cfg.thinker_config, dtype=dtype, rngs=rngs)
        if "talker" in parts:
            from omni_jax.models.talker import Talker

            self.talker = Talker(cfg.talker_config, dtype=dtype, rngs=rngs)
        else:
            self.talker = None
        if "code2wav" in parts:
            from omni_jax.models.code2wav import Code2Wav

            self.code2wav = Code2Wav(cfg.code2wav_config, dtype=dtype, rngs=rngs)
        else:
            self.code2wav = None

    def skipped_prefixes(self) -> tuple[str, ...]:
        """Checkpoint prefixes that this model deliberately does not hold."""
        return tuple(f"{p}." for p in ALL_PARTS if getattr(self, p) is None)

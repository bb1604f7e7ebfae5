"""`omni-jax init`: a randomly initialised model written as a complete HF directory (weights, config,
tokenizer, chat template, processor and generation settings), ready for `omni-jax generate`."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
from flax import nnx

from omni_jax.checkpoint.hf import save_hf
from omni_jax.config import TINY_VOCAB, ConfigError, preset
from omni_jax.models.omni import OmniModel, default_parts

EXAMPLE_MESSAGES = "example_messages.json"


def write_random_model(out: str, *, preset_name: str = "tiny", seed: int = 0, parts=None,
                       max_shard_bytes: int = 4 << 30) -> str:
    cfg = preset(preset_name)
    if cfg.thinker_config.text_config.vocab_size != TINY_VOCAB:
        raise ConfigError(f"`init` writes the tiny tokenizer, which only fits the tiny preset (got {preset_name!r})")
    from omni_jax.processing.tiny_tokenizer import write_processor_config, write_tiny_tokenizer

    parts = tuple(parts) if parts is not None else default_parts(cfg)
    model = OmniModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed), parts=parts)
    os.makedirs(out, exist_ok=True)
    save_hf(model, cfg, out, max_shard_bytes=max_shard_bytes)
    write_tiny_tokenizer(out)
    write_processor_config(out)
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump({"do_sample": False, "max_new_tokens": 32, "eos_token_id": [cfg.im_end_token_id],
                   "pad_token_id": cfg.im_end_token_id}, f, indent=2)
    with open(os.path.join(out, EXAMPLE_MESSAGES), "w") as f:
        json.dump([{"role": "system", "content": "You are a helpful assistant."},
                   {"role": "user", "content": "Say hello in three words."}], f, indent=2)
    return out

"""`omni-jax init`: a randomly initialised model written as a complete HF directory (weights, config,
tokenizer, chat template, processor and generation settings), ready for `omni-jax generate`."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
from flax import nnx

from omni_jax.checkpoint.hf import write_hf_files
from omni_jax.checkpoint.safe_write import atomic_dir, check_output_dir
from omni_jax.config import TINY_VOCAB, ConfigError, preset
from omni_jax.models.omni import OmniModel, default_parts

EXAMPLE_MESSAGES = "example_messages.json"


def write_random_model(out: str, *, preset_name: str = "tiny", seed: int = 0, parts=None,
                       max_shard_bytes: int = 4 << 30, overwrite: bool = False) -> str:
    """Write the directory into a temporary sibling and move it into place when complete (a non-empty `out` is
    refused unless `overwrite`; see omni_jax/checkpoint/safe_write.py)."""
    check_output_dir(out, overwrite=overwrite)  # before building the model
    cfg = preset(preset_name)
    if cfg.thinker_config.text_config.vocab_size != TINY_VOCAB:
        raise ConfigError(f"`init` writes the tiny tokenizer, which only fits the tiny preset (got {preset_name!r})")
    from omni_jax.processing.tiny_tokenizer import write_processor_config, write_tiny_tokenizer

    parts = tuple(parts) if parts is not None else default_parts(cfg)
    model = OmniModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed), parts=parts)
    with atomic_dir(out, overwrite=overwrite) as tmp:
        write_hf_files(model, cfg, tmp, max_shard_bytes=max_shard_bytes)
        write_tiny_tokenizer(tmp)
        write_processor_config(tmp)
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump({"do_sample": False, "max_new_tokens": 32, "eos_token_id": [cfg.im_end_token_id],
                       "pad_token_id": cfg.im_end_token_id}, f, indent=2)
        with open(os.path.join(tmp, EXAMPLE_MESSAGES), "w") as f:
            json.dump([{"role": "system", "content": "You are a helpful assistant."},
                       {"role": "user", "content": "Say hello in three words."}], f, indent=2)
    return out

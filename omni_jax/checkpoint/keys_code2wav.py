"""Key-table rules for the code2wav part (HF on-disk name <-> omni_jax path). See checkpoint/keys.py."""

from omni_jax.checkpoint.keys import Rule  # noqa: F401

RULES: list = []

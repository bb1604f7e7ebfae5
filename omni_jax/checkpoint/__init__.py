"""Checkpoint conversion: HF safetensors <-> omni_jax (key tables in `keys.py`), Orbax I/O in `orbax_io.py`."""

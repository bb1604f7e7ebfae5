"""AuT audio encoder: time and peak memory at 1, 10 and 40 minutes of audio (linear growth), plus the
full-size encoder's compiled cost at 40 minutes via jax.eval_shape / XLA cost analysis (nothing allocated).

    python bench/audio_encoder_scaling.py [--minutes 1 10 40] [--d-model 256 --layers 4]

Each length runs in a fresh subprocess so its peak RSS (ru_maxrss) is its own. Time is the encoder call
(features -> tokens) after compilation; features are computed beforehand (numpy).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def run_one(minutes: float, d_model: int, layers: int, conv_batch: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from omni_jax.config import AudioEncoderConfig
    from omni_jax.models.audio_encoder import AudioEncoder

    cfg = AudioEncoderConfig(d_model=d_model, encoder_attention_heads=max(1, d_model // 64),
                             encoder_ffn_dim=4 * d_model, encoder_layers=layers, downsample_hidden_size=64,
                             output_dim=d_model)
    enc = AudioEncoder(cfg, rngs=nnx.Rngs(0))
    frames = int(minutes * 60 * 100)
    feats = jnp.asarray(np.random.RandomState(0).randn(1, 128, frames).astype(np.float32) * 0.3)
    lengths = jnp.asarray([frames], jnp.int32)
    graphdef, state = nnx.split(enc)

    @jax.jit
    def f(state, x, n):
        return nnx.merge(graphdef, state)(x, n, conv_batch=conv_batch)

    compiled = f.lower(state, feats, lengths).compile()
    mem = compiled.memory_analysis()
    jax.block_until_ready(compiled(state, feats, lengths))
    t = time.perf_counter()
    out, n = compiled(state, feats, lengths)
    jax.block_until_ready(out)
    dt = time.perf_counter() - t
    return {"minutes": minutes, "frames": frames, "tokens": int(n[0]), "seconds": dt,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "xla_temp_mb": getattr(mem, "temp_size_in_bytes", 0) / 2**20}


def full_size_cost(minutes: float, conv_batch: int) -> dict:
    """Released widths (32 layers, d_model 1280), bf16: compile-time memory and FLOPs, no weights allocated."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from omni_jax.config import released_30b_a3b
    from omni_jax.models.audio_encoder import AudioEncoder

    cfg = released_30b_a3b().thinker_config.audio_config
    abstract = nnx.eval_shape(lambda: AudioEncoder(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    frames = int(minutes * 60 * 100)
    x = jax.ShapeDtypeStruct((1, 128, frames), jnp.float32)
    n = jax.ShapeDtypeStruct((1,), jnp.int32)

    def f(state, x, n):
        return nnx.merge(graphdef, state)(x, n, conv_batch=conv_batch)

    out = jax.eval_shape(f, state, x, n)
    lowered = jax.jit(f).lower(state, x, n)
    cost = lowered.cost_analysis() or {}
    if isinstance(cost, list):
        cost = cost[0]
    compiled = lowered.compile()
    mem = compiled.memory_analysis()
    params = sum(v.size * v.dtype.itemsize for v in jax.tree.leaves(state))
    return {"minutes": minutes, "output_shape": list(out[0].shape), "tflops": cost.get("flops", 0) / 1e12,
            "param_gb": params / 2**30, "xla_temp_gb": getattr(mem, "temp_size_in_bytes", 0) / 2**30}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--minutes", type=float, nargs="+", default=[1, 10, 40])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--conv-batch", type=int, default=100)
    p.add_argument("--one", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--full-size", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one is not None:
        print(json.dumps(run_one(a.one, a.d_model, a.layers, a.conv_batch)))
        return 0
    if a.full_size:
        print(json.dumps(full_size_cost(40, a.conv_batch)))
        return 0
    rows = []
    for m in a.minutes:
        r = subprocess.run([sys.executable, __file__, "--one", str(m), "--d-model", str(a.d_model), "--layers",
                            str(a.layers), "--conv-batch", str(a.conv_batch)], capture_output=True, text=True,
                           check=True)
        rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
    print(f"reduced-width encoder: d_model {a.d_model}, {a.layers} layers, conv_batch {a.conv_batch}; "
          f"{os.cpu_count()} cpus")
    print(f"{'minutes':>8s} {'tokens':>8s} {'time s':>8s} {'s/min':>7s} {'peak RSS MB':>12s} {'XLA temp MB':>12s}")
    for r in rows:
        print(f"{r['minutes']:8.0f} {r['tokens']:8d} {r['seconds']:8.2f} {r['seconds'] / r['minutes']:7.3f} "
              f"{r['peak_rss_mb']:12.0f} {r['xla_temp_mb']:12.0f}")
    r = subprocess.run([sys.executable, __file__, "--full-size", "--conv-batch", str(a.conv_batch)],
                       capture_output=True, text=True, check=True)
    fs = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"full size (released widths, bf16) at 40 min: output {fs['output_shape']}, {fs['tflops']:.1f} TFLOP, "
          f"weights {fs['param_gb']:.2f} GiB, XLA temporaries {fs['xla_temp_gb']:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())

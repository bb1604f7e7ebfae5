"""MoE part of a decode step: each `kernels.moe` decode implementation over L layers, one token at a time.

    python bench/moe_decode.py [--layers 6] [--experts 32] [--hidden 384] [--inner 192] [--top-k 4] [--tokens 64]

Every layer has its own expert weights (L x E experts in all, 170 MB fp32 at the defaults, more than a CPU's
last-level cache) and each token's experts are drawn uniformly at random, so the step reads weights from memory
as a trained model's spread routing does. All implementations run in the same process, interleaved; prints the
median ms per token of each and its ratio to `gather` (the decode path `auto` picks).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

REPS = 7


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--inner", type=int, default=192)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--impls", default="gather,slices,tiled")
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from omni_jax.kernels.moe.ref import expert_ffn_gather, expert_ffn_slices, expert_ffn_tiled

    impls = {"gather": expert_ffn_gather, "slices": expert_ffn_slices, "tiled": expert_ffn_tiled}
    names = args.impls.split(",")
    nl, e, h, i, k = args.layers, args.experts, args.hidden, args.inner, args.top_k
    r = np.random.default_rng(0)
    scale = 1 / np.sqrt(h)
    shapes = ((e, i, h), (e, i, h), (e, h, i))  # gate, up [E, I, H]; down [E, H, I] (the model's layout)
    weights = [tuple(jnp.asarray(r.normal(size=s).astype(np.float32) * scale) for s in shapes) for _ in range(nl)]

    def make(fn):
        @jax.jit
        def run(x, key, weights):
            def body(_, carry):
                x, key = carry
                key, sub = jax.random.split(key)
                for layer, (wg, wu, wd) in enumerate(weights):
                    idx = jax.random.choice(jax.random.fold_in(sub, layer), e, (1, k), replace=False)
                    w = jnp.full((1, k), 1.0 / k, x.dtype)
                    x = x + 0.5 * fn(x, idx.astype(jnp.int32), w, wg, wu, wd)
                return x / jnp.linalg.norm(x), key
            return jax.lax.fori_loop(0, args.tokens, body, (x, key))[0]
        return run

    x = jnp.asarray(r.normal(size=(1, h)).astype(np.float32))
    key = jax.random.PRNGKey(0)
    runs = {n: make(impls[n]) for n in names}
    outs = {n: np.asarray(f(x, key, weights)) for n, f in runs.items()}  # compile + check agreement
    for n in names:
        err = float(np.abs(outs[n] - outs[names[0]]).max())
        if err > 1e-4:
            print(f"{n} disagrees with {names[0]}: {err:.2e}")
            return 1
    times = {n: [] for n in names}
    for _ in range(REPS):
        for n, f in runs.items():
            t = time.perf_counter()
            jax.block_until_ready(f(x, key, weights))
            times[n].append((time.perf_counter() - t) / args.tokens * 1e3)
    mb = nl * e * 3 * h * i * 4 / 2**20
    print(f"{nl} layers x {e} experts (hidden {h}, inner {i}, top-{k}; {mb:.0f} MB of expert weights), "
          f"{args.tokens} tokens, random routing; jax {jax.__version__} ({jax.devices()[0].platform})")
    base = np.median(times["gather"]) if "gather" in times else None
    for n in names:
        med = np.median(times[n])
        rel = f"  {med / base:5.2f}x gather's time" if base else ""
        print(f"{n:8s} {med:8.3f} ms/token (median of {REPS}){rel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

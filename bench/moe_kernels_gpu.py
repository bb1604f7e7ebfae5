"""The GPU MoE kernels against the XLA paths: parity (fp32, reduced width) and timings (bf16, released width).

    python bench/moe_kernels_gpu.py                   # on a GPU: parity + timings, one JSON line per figure
    python bench/moe_kernels_gpu.py --lower-only      # any host: lower the Triton kernels for CUDA (an H200)

Prefill/training (`--tokens`, default 2048 and 8192): `triton_gmm` vs `bucketed` and `sorted`, forward and
forward+backward. Decode (`--decode-tokens`, default 1 and 8): `fused_decode` vs `gather`. Shapes: the released
thinker's experts (E=128, top-8, hidden 2048, expert inner 768). Each figure is the median of REPS timed calls after
a warm-up, all implementations in one process. Change `kernels.moe.api.AUTO` when these say so.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

REPS = 10


def _inputs(n, h, i, e, k, dtype, seed=0):
    import jax.numpy as jnp

    r = np.random.default_rng(seed)
    x = r.normal(size=(n, h)).astype(np.float32)
    idx = np.argsort(r.random((n, e)), axis=1)[:, :k].astype(np.int32)  # spread routing, distinct experts
    w = r.random((n, k)).astype(np.float32)
    wg, wu = (r.normal(size=(e, i, h)).astype(np.float32) * h ** -0.5 for _ in range(2))
    wd = r.normal(size=(e, h, i)).astype(np.float32) * i ** -0.5
    return tuple(jnp.asarray(a, jnp.int32 if a.dtype == np.int32 else dtype) for a in (x, idx, w, wg, wu, wd))


def _time(f, *args):
    import jax

    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(REPS):
        t = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def _train(impl):
    import jax
    import jax.numpy as jnp

    from omni_jax.kernels.moe import api

    def f(x, idx, w, wg, wu, wd):
        def loss(x, w, wg, wu, wd):
            return jnp.sum(api.expert_ffn(x, idx, w, wg, wu, wd, impl=impl).astype(jnp.float32) ** 2)
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(x, w, wg, wu, wd)
    return jax.jit(f)


def lower_only():
    import jax
    import jax.numpy as jnp
    from jax._src.mesh import AbstractDevice

    from omni_jax.kernels.moe import api

    mesh = jax.sharding.AbstractMesh((1,), ("data",), abstract_device=AbstractDevice("NVIDIA H200", 1, "gpu"))
    checks = [jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for n in (2048, 4):
        sd = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in _inputs(n, 2048, 768, 128, 8, jnp.bfloat16)]
        with jax.sharding.use_abstract_mesh(mesh):
            fns = [(f"auto -> {api.choose_impl(n, 8, 128)}", jax.jit(lambda *a: api.expert_ffn(*a))),
                   ("triton_gmm forward+backward", _train("triton_gmm"))]
            for name, f in fns:
                txt = jax.export.export(f, platforms=["cuda"], disabled_checks=checks)(*sd).mlir_module()
                print(json.dumps({"jax": jax.__version__, "tokens": n, "fn": name,
                                  "triton_calls": txt.count("custom_call @__gpu$xla.gpu.triton")}))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="2048,8192")
    p.add_argument("--decode-tokens", default="1,8")
    p.add_argument("--lower-only", action="store_true")
    args = p.parse_args(argv)
    if args.lower_only:
        return lower_only()
    import jax
    import jax.numpy as jnp

    from omni_jax.kernels.moe import api

    dev = jax.devices()[0]
    base = {"device": dev.device_kind, "jax": jax.__version__}
    # parity at reduced width, fp32: forward <= 1e-5, gradients <= 1e-4 relative to `dense`
    small = _inputs(96, 256, 128, 16, 4, jnp.float32)
    want, wgrads = api.IMPLS["dense"](*small), _train("dense")(*small)
    for impl in ("triton_gmm", "fused_decode"):
        got, grads = jax.jit(api.IMPLS[impl])(*small), _train(impl)(*small)
        rel = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        grel = max(float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b))) for a, b in zip(grads, wgrads))
        print(json.dumps({**base, "parity": impl, "fwd_rel": rel, "grad_rel": grel}), flush=True)
    h, i, e, k = 2048, 768, 128, 8
    for n in map(int, args.tokens.split(",")):
        a = _inputs(n, h, i, e, k, jnp.bfloat16)
        flops = 2 * n * k * 3 * h * i
        for impl in ("triton_gmm", "bucketed", "sorted"):
            fwd = _time(jax.jit(api.IMPLS[impl]), *a)
            tr = _time(_train(impl), *a)
            print(json.dumps({**base, "phase": "prefill", "tokens": n, "impl": impl, "fwd_ms": fwd * 1e3,
                              "fwd_tflops": flops / fwd / 1e12, "train_ms": tr * 1e3,
                              "train_tflops": 3 * flops / tr / 1e12}), flush=True)
    for n in map(int, args.decode_tokens.split(",")):
        a = _inputs(n, h, i, e, k, jnp.bfloat16)
        for impl in ("fused_decode", "gather"):
            t = _time(jax.jit(api.IMPLS[impl]), *a)
            read = n * k * 3 * h * i * 2  # bytes of selected expert weights (upper bound: distinct experts)
            print(json.dumps({**base, "phase": "decode", "tokens": n, "impl": impl, "ms": t * 1e3,
                              "weight_GBps": read / t / 1e9}), flush=True)


if __name__ == "__main__":
    main()

"""megablox inside the expert-parallel shard_map on 8 simulated CPU devices (run by tests/test_moe_pallas.py in a
subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8). Prints "name relative_error" lines: the
forward and each gradient against the dense oracle on one device."""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from omni_jax import sharding as S  # noqa: E402
from omni_jax.kernels.moe import api  # noqa: E402
from omni_jax.kernels.moe import expert_parallel as EP  # noqa: E402
from omni_jax.kernels.moe.ref import expert_ffn_dense  # noqa: E402


def main():
    r = np.random.RandomState(0)
    n, h, i, e, k = 14, 24, 16, 8, 3  # 14 tokens: not a multiple of the 8 token shards (padding rows)
    x = r.randn(n, h).astype(np.float32)
    idx = np.stack([r.choice([0, 1, 2, 3, 5, 6], k, replace=False) for _ in range(n)]).astype(np.int32)
    idx[: n // 2, 0] = 2  # skewed: experts 4 and 7 receive nothing
    w = r.rand(n, k).astype(np.float32)
    wg, wu = (r.randn(e, i, h).astype(np.float32) * 0.3 for _ in range(2))
    wd = r.randn(e, h, i).astype(np.float32) * 0.3
    probe = r.randn(n, h).astype(np.float32)
    x, idx, w, wg, wu, wd, probe = map(jnp.asarray, (x, idx, w, wg, wu, wd, probe))

    def loss(f):
        return lambda x, w, wg, wu, wd: jnp.sum(f(x, idx, w, wg, wu, wd) * probe)

    want = expert_ffn_dense(x, idx, w, wg, wu, wd)
    wants = jax.grad(loss(expert_ffn_dense), argnums=(0, 1, 2, 3, 4))(x, w, wg, wu, wd)
    mesh = S.make_mesh("data=2,expert=4")
    calls = []
    orig = EP._local_ffn

    def spy(*a):
        calls.append(a[-1])
        return orig(*a)

    EP._local_ffn = spy

    def ffn(*a):
        return api.expert_ffn(*a, impl="megablox")

    with S.activate(mesh):
        got = jax.jit(ffn)(x, idx, w, wg, wu, wd)
        grads = jax.jit(jax.grad(loss(ffn), argnums=(0, 1, 2, 3, 4)))(x, w, wg, wu, wd)
    assert calls and set(calls) == {"megablox"}, calls  # ran expert-parallel, megablox inside

    def rel(a, b):
        return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))

    print("fwd", rel(got, want))
    for name, g, gw in zip(["dx", "dw_route", "dgate", "dup", "ddown"], grads, wants):
        print(name, rel(g, gw))


if __name__ == "__main__":
    main()

"""megablox on 8 simulated CPU devices: inside the expert-parallel shard_map (data=2, expert=4) and per device on
its own tokens on a mesh without experts (fsdp=4, tensor=2) (run by tests/test_moe_pallas.py in a
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
    calls = []
    orig_ep, orig_shards = EP._local_ffn, EP.expert_ffn_token_shards

    def spy_ep(*a):
        calls.append(("expert", a[-1]))
        return orig_ep(*a)

    def spy_shards(*a, impl, **kw):
        calls.append(("tokens", impl))
        return orig_shards(*a, impl=impl, **kw)

    EP._local_ffn, EP.expert_ffn_token_shards = spy_ep, spy_shards

    def ffn(*a):
        return api.expert_ffn(*a, impl="megablox")

    def rel(a, b):
        return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))

    # expert parallel (megablox inside the EP shard_map); tokens split over data x fsdp, weights FSDP + tensor
    # (gradients on the EP mesh only: the same shard_map transpose, weights replicated over `data` there)
    for tag, spec, how in [("", "data=2,expert=4", "expert"), ("fsdp_", "fsdp=4,tensor=2", "tokens")]:
        calls.clear()
        with S.activate(S.make_mesh(spec)):
            got = jax.jit(ffn)(x, idx, w, wg, wu, wd)
            grads = jax.jit(jax.grad(loss(ffn), argnums=(0, 1, 2, 3, 4)))(x, w, wg, wu, wd) if not tag else ()
        assert calls and set(calls) == {(how, "megablox")}, calls
        print(tag + "fwd", rel(got, want))
        for name, g, gw in zip(["dx", "dw_route", "dgate", "dup", "ddown"], grads, wants):
            print(tag + name, rel(g, gw))


if __name__ == "__main__":
    main()

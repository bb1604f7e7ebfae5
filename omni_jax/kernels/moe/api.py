"""The one expert-FFN entry point the MoE layers call.

`impl="auto"` picks by token count: with few token copies (decode) the gather path reads only the selected
experts' weights; with many (prefill, training) tokens are grouped by expert and run through a grouped matmul.
On CPU/GPU XLA lowers `ragged_dot` densely over all experts, so for decode the gather path is much cheaper
(see docs/PERFORMANCE.md). Expert weights are [E, out, in] (torch's Linear layout): gate/up [E, I, H], down
[E, H, I]. Pallas grouped-matmul kernels (megablox on TPU) plug in here.

Under a mesh with an `expert` axis > 1 (omni_jax.sharding.activate) the call runs expert-parallel
(kernels/moe/expert_parallel.py): tokens go to the devices holding their experts, and `impl` picks the local
grouped matmul there. Without a mesh nothing changes.
"""

from __future__ import annotations

from omni_jax.kernels.moe import expert_parallel
from omni_jax.kernels.moe.ref import (
    expert_ffn_bucketed,
    expert_ffn_dense,
    expert_ffn_gather,
    expert_ffn_slices,
    expert_ffn_sorted,
    expert_ffn_tiled,
)
from omni_jax.kernels.platform import platform_of

IMPLS = {"sorted": expert_ffn_sorted, "tiled": expert_ffn_tiled, "bucketed": expert_ffn_bucketed,
         "slices": expert_ffn_slices, "gather": expert_ffn_gather, "dense": expert_ffn_dense}


def choose_impl(num_tokens: int, top_k: int, num_experts: int, backend: str | None = None) -> str:
    """Decode (token copies no more than the experts) reads only the selected experts: `gather` (one gather of
    their gate/up rows, two batched matrix-vector products; on CPU 1.16-1.36x faster than the unrolled in-place
    `slices` when routing spreads over more expert weights than fit in cache, equal when they fit; on an H200
    0.37 ms vs 0.63 ms at the released width). Prefill/training: grouped matmul, `ragged_dot` on TPU (native
    grouped matmul); elsewhere capacity buckets (XLA's CPU/GPU `ragged_dot` is dense over all experts: 24x slower
    on an H200). Figures: docs/PERFORMANCE.md."""
    copies = num_tokens * top_k
    backend = backend or platform_of()  # the devices compiled for (a TPU topology from a CPU host: "tpu")
    if copies <= num_experts:
        return "gather"
    return "sorted" if backend == "tpu" else "bucketed"


def expert_ffn(x, idx, weights, w_gate, w_up, w_down, *, impl: str = "auto"):
    """x [N, H], idx [N, K], weights [N, K], w_gate/w_up [E, I, H], w_down [E, H, I] -> [N, H]."""
    if impl != "auto" and impl not in IMPLS:
        raise ValueError(f"unknown expert_ffn impl {impl!r}; available: {sorted(IMPLS)} or 'auto'")
    if expert_parallel.is_active():
        return expert_parallel.expert_ffn_ep(x, idx, weights, w_gate, w_up, w_down, impl=impl)
    if impl == "auto":
        impl = choose_impl(x.shape[0], idx.shape[1], w_gate.shape[0])
    return IMPLS[impl](x, idx, weights, w_gate, w_up, w_down)

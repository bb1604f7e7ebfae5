"""The one expert-FFN entry point the MoE layers call.

Implementations (`IMPLS`), all computing the same function (kernels/moe/ref.py states it):
- pure JAX (any platform): `sorted` (ragged_dot), `tiled`, `bucketed`, `slices`, `gather`, `dense` (test oracle);
- Pallas TPU: `megablox` (grouped matmuls, kernels/moe/megablox.py);
- Pallas Triton (GPU): `triton_gmm` (grouped matmuls for prefill/training), `fused_decode` (one program per
  (token, expert) pair, decode), kernels/moe/triton_gmm.py and fused_decode.py.
A Pallas implementation runs compiled on its own platform and in interpret mode on CPU (tests); on the other
accelerator it is refused with a clear error.

`impl="auto"` picks from `AUTO` by the platform of the devices the computation is traced for
(kernels/platform.py: the active mesh's devices, so compiling for a TPU topology from a CPU host picks the TPU
kernels) and by size: decode (token copies no more than the experts) or prefill/training. Expert weights are
[E, out, in] (torch's Linear layout): gate/up [E, I, H], down [E, H, I]; no implementation copies them transposed.

Under a mesh with an `expert` axis > 1 (omni_jax.sharding.activate) the call runs expert-parallel
(kernels/moe/expert_parallel.py): tokens go to the devices holding their experts, and `impl` picks the local
grouped matmul there. Without a mesh nothing changes.
"""

from __future__ import annotations

from omni_jax.errors import OmniJaxError
from omni_jax.kernels.moe import expert_parallel
from omni_jax.kernels.moe.fused_decode import expert_ffn_fused_decode
from omni_jax.kernels.moe.megablox import expert_ffn_megablox
from omni_jax.kernels.moe.ref import (
    expert_ffn_bucketed,
    expert_ffn_dense,
    expert_ffn_gather,
    expert_ffn_slices,
    expert_ffn_sorted,
    expert_ffn_tiled,
)
from omni_jax.kernels.moe.triton_gmm import expert_ffn_triton_gmm
from omni_jax.kernels.platform import normalise_platform, platform_of


class MoEImplError(OmniJaxError):
    """An expert_ffn implementation name that does not exist or cannot run on the target platform."""


IMPLS = {"sorted": expert_ffn_sorted, "tiled": expert_ffn_tiled, "bucketed": expert_ffn_bucketed,
         "slices": expert_ffn_slices, "gather": expert_ffn_gather, "dense": expert_ffn_dense,
         "megablox": expert_ffn_megablox, "triton_gmm": expert_ffn_triton_gmm,
         "fused_decode": expert_ffn_fused_decode}

# Pallas kernels: the platform they compile for (elsewhere than there and CPU's interpret mode they are refused).
KERNEL_PLATFORM = {"megablox": "tpu", "triton_gmm": "gpu", "fused_decode": "gpu"}

# Implementations that skip token copies routed to the sentinel expert id E (the expert-parallel receive buffers'
# empty rows) instead of computing them.
SKIPS_SENTINEL = frozenset({"megablox", "triton_gmm", "fused_decode"})

# impl="auto": (platform, phase) -> implementation. One entry per choice, so a measurement changes one line.
# - cpu decode: `gather` (one gather of the selected gate/up rows, two batched GEMVs on contiguous rows; 1.16-1.36x
#   faster than the in-place `slices` when routing spreads beyond cache). cpu prefill: `bucketed` (XLA's CPU
#   `ragged_dot` is dense over all experts). Figures: docs/PERFORMANCE.md.
# - gpu: our Triton kernels (not yet measured on a GPU: `gather` took 0.37 ms/layer at decode and `bucketed`
#   125 TFLOP/s at prefill on an H200; change these entries when a measurement says so).
# - tpu: megablox for both (its grid visits only non-empty groups, so decode reads only the selected experts).
AUTO = {("cpu", "decode"): "gather", ("cpu", "prefill"): "bucketed",
        ("gpu", "decode"): "fused_decode", ("gpu", "prefill"): "triton_gmm",
        ("tpu", "decode"): "megablox", ("tpu", "prefill"): "megablox"}


def available_impls(platform: str | None = None) -> list[str]:
    """Names `expert_ffn` accepts on `platform` (default: the target platform), plus 'auto'."""
    platform = platform or platform_of()
    return ["auto"] + sorted(n for n in IMPLS if KERNEL_PLATFORM.get(n, platform) in (platform, "cpu")
                             or platform == "cpu")


def check_impl(impl: str, platform: str | None = None) -> str:
    """Raise MoEImplError for an unknown name or a kernel of another accelerator; return the name."""
    platform = platform or platform_of()
    if impl != "auto" and impl not in IMPLS:
        raise MoEImplError(f"unknown expert_ffn impl {impl!r}; available: {', '.join(available_impls(platform))}")
    native = KERNEL_PLATFORM.get(impl)
    if native is not None and platform not in (native, "cpu"):
        raise MoEImplError(f"expert_ffn impl {impl!r} is a {native.upper()} kernel and cannot run on {platform}; "
                           f"available: {', '.join(available_impls(platform))}")
    return impl


def choose_impl(num_tokens: int, top_k: int, num_experts: int, backend: str | None = None) -> str:
    """`AUTO[platform, phase]`; phase is decode when the token copies are no more than the experts (a decode
    step reads only the selected experts' weights), else prefill."""
    platform = normalise_platform(backend) if backend else platform_of()
    phase = "decode" if num_tokens * top_k <= num_experts else "prefill"
    return AUTO.get((platform, phase), AUTO[("cpu", phase)])


def expert_ffn(x, idx, weights, w_gate, w_up, w_down, *, impl: str = "auto"):
    """x [N, H], idx [N, K], weights [N, K], w_gate/w_up [E, I, H], w_down [E, H, I] -> [N, H]."""
    check_impl(impl)
    if expert_parallel.is_active():
        return expert_parallel.expert_ffn_ep(x, idx, weights, w_gate, w_up, w_down, impl=impl)
    if impl == "auto":
        impl = choose_impl(x.shape[0], idx.shape[1], w_gate.shape[0])
    return IMPLS[impl](x, idx, weights, w_gate, w_up, w_down)

"""Names of the kernel implementations a user can choose (`omni-jax generate --moe-impl/--attention-impl`,
`config.loss.moe_impl/attention_impl` for `omni-jax train`), and the check that a choice exists and can run on
the target platform.

This module imports no jax at import time (the CLI lists the names in --help); the check asks the kernel entry
points (`kernels.moe.api.IMPLS`, `kernels.attention.api.IMPLS`) what this build really has.

"auto" picks by the platform of the devices the step is compiled for (kernels/platform.py): the Pallas TPU
kernels (megablox, splash) on TPU, the XLA paths elsewhere. The Pallas TPU kernels also run on CPU in interpret
mode (slow; for tests and for checking a TPU run on a laptop), but not on GPU; see RUNS_ON.
"""

from __future__ import annotations

from omni_jax.errors import OmniJaxError

MOE_IMPLS = ("auto", "megablox", "sorted", "tiled", "bucketed", "slices", "gather", "dense")
ATTENTION_IMPLS = ("auto", "xla", "live", "splash", "flash", "cudnn", "decode")
# Where a kernel runs: Pallas TPU kernels on TPU, Pallas Triton kernels on GPU (both also on CPU in interpret
# mode), cuDNN only on GPU. Names not listed run everywhere (XLA).
RUNS_ON = {"megablox": ("tpu", "cpu"), "splash": ("tpu", "cpu"), "flash": ("gpu", "cpu"), "decode": ("gpu", "cpu"),
           "cudnn": ("gpu",)}


class KernelChoiceError(OmniJaxError):
    """An unknown kernel implementation name, or one that cannot run on the target platform."""


def _available(kind: str) -> tuple[str, ...]:
    if kind == "moe":
        from omni_jax.kernels.moe.api import IMPLS
    else:
        from omni_jax.kernels.attention.api import IMPLS
    return tuple(dict.fromkeys(("auto", *IMPLS)))


def check_impl(kind: str, name: str, platform: str | None = None, flag: str | None = None) -> str:
    """Return `name` if it is a `kind` ("moe" or "attention") implementation that runs on `platform` (default:
    the active mesh's, else jax's default backend); else raise KernelChoiceError naming the choices. `flag`
    names the option in the message (default --KIND-impl)."""
    flag = flag or f"--{kind}-impl"
    available = _available(kind)
    if name not in available:
        listed = MOE_IMPLS if kind == "moe" else ATTENTION_IMPLS
        why = "is not available in this build" if name in listed else "is unknown"
        raise KernelChoiceError(f"{flag} {name!r} {why}; choose one of: {', '.join(available)}")
    if name in RUNS_ON:
        from omni_jax.kernels.platform import platform_of

        target = platform or platform_of()
        if target not in RUNS_ON[name]:
            raise KernelChoiceError(f"{flag} {name!r} runs on {' or '.join(RUNS_ON[name])} (cpu: interpret mode), "
                                    f"not on {target}; use 'auto' or an XLA implementation")
    return name

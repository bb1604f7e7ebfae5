"""The kernel implementations a user can choose (`omni-jax generate --moe-impl/--attention-impl`, `omni-jax plan
--compile`, `config.loss.moe_impl/attention_impl` for `omni-jax train`), checked before any work starts.

The names are listed here without importing jax (the CLI shows them in --help); tests/test_tpu_compile.py keeps
them equal to the kernel entry points' own tables (`kernels.moe.api.IMPLS`, `kernels.attention.IMPLS`), which
`check_impl` asks. "auto" picks by the platform of the devices the step is compiled for (kernels/platform.py):
megablox / splash on TPU, the Triton kernels on GPU, the XLA paths on CPU. Pallas kernels also run on CPU in
interpret mode (slow; for tests and for checking a TPU run on this machine), never on the other accelerator.
"""

from __future__ import annotations

from omni_jax.errors import OmniJaxError

MOE_IMPLS = ("auto", "megablox", "triton_gmm", "fused_decode", "sorted", "tiled", "bucketed", "slices", "gather",
             "dense")
ATTENTION_IMPLS = ("auto", "splash", "flash", "decode", "cudnn", "xla", "live")
# Attention kernels tied to an accelerator (kernels.attention checks names only): Pallas kernels also run on CPU
# in interpret mode, cuDNN does not.
ATTENTION_RUNS_ON = {"splash": ("tpu", "cpu"), "flash": ("gpu", "cpu"), "decode": ("gpu", "cpu"), "cudnn": ("gpu",)}


class KernelChoiceError(OmniJaxError):
    """An unknown kernel implementation name, or one that cannot run on the target platform."""


def check_impl(kind: str, name: str, platform: str | None = None, flag: str | None = None) -> str:
    """Return `name` if it is a `kind` ("moe" or "attention") implementation that runs on `platform` (default:
    the active mesh's, else jax's default backend); else raise KernelChoiceError (one line, naming `flag`,
    default --KIND-impl, and the choices)."""
    from omni_jax.kernels.platform import normalise_platform, platform_of

    flag = flag or f"--{kind}-impl"
    platform = normalise_platform(platform) if platform else platform_of()
    try:
        if kind == "moe":
            from omni_jax.kernels.moe.api import check_impl as check_moe

            check_moe(name, platform)
        else:
            from omni_jax.kernels.attention import IMPLS
            from omni_jax.kernels.attention import check_impl as check_attention

            check_attention(name)
            runs_on = ATTENTION_RUNS_ON.get(name)
            if runs_on is not None and platform not in runs_on:
                ok = [n for n in IMPLS if platform in ATTENTION_RUNS_ON.get(n, (platform,))]
                where = " or ".join(p + (" (interpret mode)" if p == "cpu" else "") for p in runs_on)
                raise KernelChoiceError(f"attention impl {name!r} runs on {where}, not on {platform}; available: "
                                        f"{', '.join(ok)}")
    except OmniJaxError as e:
        raise KernelChoiceError(f"{flag}: {e}") from e
    return name

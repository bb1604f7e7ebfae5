"""The base of every error omni_jax raises for bad input, so the CLI can print one clear line for it."""


class OmniJaxError(ValueError):
    """Bad user input: a config, checkpoint, messages file, media file or request that cannot be served."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Error classes the CLI reports as one line (no traceback)."""
    return (OmniJaxError, FileNotFoundError, IsADirectoryError, PermissionError)

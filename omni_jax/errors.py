"""The base of every error omni_jax raises for bad input, so the CLI can print one clear line for it."""


class OmniJaxError(ValueError):
    """Bad user input: a config, checkpoint, messages file, media file or request that cannot be served."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Error classes the CLI reports as one line (no traceback)."""
    return (OmniJaxError, FileNotFoundError, IsADirectoryError, PermissionError)


def check_input_file(path: str, what: str, error: type[OmniJaxError]) -> None:
    """Raise `error` naming `what` ("audio", "video", ...) for a missing, non-regular or empty input file."""
    import os

    if not os.path.exists(path):
        raise error(f"{what} file not found: {path!r}")
    if not os.path.isfile(path):
        raise error(f"{what} path is not a file: {path!r}")
    if os.path.getsize(path) == 0:
        raise error(f"{what} file is empty (0 bytes): {path!r}")

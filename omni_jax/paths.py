"""Paths that may be URLs: training workdirs, checkpoints, exports and data files live on a local disk or in object
storage (`gs://bucket/run`, anything `etils.epath` / Orbax / TensorStore open).

A URL is never turned into a local folder (`os.path.abspath("gs://b/run")` would give `<cwd>/gs:/b/run`); local
paths are made absolute so that a run and its resume agree whatever the working directory. File access goes
through `etils.epath`, which reads and writes both kinds.
"""

from __future__ import annotations

import os
import re

from etils import epath

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str) -> bool:
    """`gs://b/x`, `s3://...`, `file:///...`: a scheme followed by `://`."""
    return bool(_URL.match(str(path)))


def resolve(path: str) -> str:
    """A URL unchanged (trailing slashes dropped); a local path absolute, with `~` expanded."""
    path = str(path)
    if is_url(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{rest.rstrip('/')}" if rest.strip("/") else path
    return os.path.abspath(os.path.expanduser(path))


def join(base: str, *parts: str) -> str:
    """`base/part/...` for URLs and local paths alike."""
    if is_url(base):
        return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(base, *parts)


def path(p: str) -> epath.Path:
    return epath.Path(p)


def exists(p: str) -> bool:
    return epath.Path(p).exists()


def isdir(p: str) -> bool:
    return epath.Path(p).is_dir()


def makedirs(p: str) -> None:
    epath.Path(p).mkdir(parents=True, exist_ok=True)


def read_text(p: str) -> str:
    return epath.Path(p).read_text()


def write_text(p: str, text: str) -> None:
    epath.Path(p).write_text(text)


class AppendFile:
    """A binary file written by appending. A local file is appended to; an object in a store (which cannot be
    appended to) is rewritten whole at a flush, at most every `min_interval_s` seconds (and at close)."""

    def __init__(self, p: str, min_interval_s: float = 10.0):
        import time

        self.path, self.local, self.interval, self._time = p, not is_url(p), min_interval_s, time.time
        if self.local:
            self.f = open(p, "ab")  # noqa: SIM115  (closed by close())
        else:
            self.buf = bytearray(epath.Path(p).read_bytes() if exists(p) else b"")
            self.last = 0.0

    def write(self, data: bytes) -> None:
        if self.local:
            self.f.write(data)
        else:
            self.buf += data

    def flush(self, force: bool = False) -> None:
        if self.local:
            self.f.flush()
        elif force or self._time() - self.last >= self.interval:
            epath.Path(self.path).write_bytes(bytes(self.buf))
            self.last = self._time()

    def close(self) -> None:
        self.flush(force=True)
        if self.local:
            self.f.close()

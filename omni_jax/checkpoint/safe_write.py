"""Directory writes that never mix or destroy checkpoints.

Every writer of a model directory (`convert`, `init`, the training export) fills a hidden temporary sibling
folder and moves it into place only when it is complete:

    with atomic_dir(out, overwrite=False, sources=(src,)) as tmp:
        ... write every file under tmp ...

A non-empty `out` is refused unless `overwrite`; with `overwrite` the old folder is swapped for the new one in one
step (Linux `renameat2(RENAME_EXCHANGE)`; elsewhere two renames) and only then deleted, so it is intact until the
new one is complete, and the two are never merged. An `out` equal to, inside, or holding a source is refused.
A writer killed mid-way leaves only its hidden `.NAME.partial-PID-*` sibling, which the next write removes.
`check_output_dir` runs the same checks before any work starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import shutil
import uuid

from omni_jax.errors import OmniJaxError


class OutputPathError(OmniJaxError):
    """An output path that cannot be written safely (exists, is a file, overlaps the source, unwritable)."""


_PARTIAL, _OLD = "partial", "old"


def _real(path: str) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(child: str, parent: str) -> bool:
    return child == parent or child.startswith(parent.rstrip(os.sep) + os.sep)


def _writable_parent(out: str, what: str) -> str:
    """The nearest existing ancestor of `out`; it must be a writable directory."""
    parent = os.path.dirname(out)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent)
    parent = parent or os.sep
    if not os.path.isdir(parent):
        raise OutputPathError(f"{what} {out!r}: {parent!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {out!r}: directory {parent!r} is not writable")
    return parent


def check_output_dir(out: str, *, overwrite: bool = False, sources=(), what: str = "output directory",
                     flag: str = "--overwrite") -> str:
    """Refuse, before any work, an output directory that `atomic_dir` would refuse; returns its absolute path."""
    if not out or not str(out).strip():
        raise OutputPathError(f"{what} is empty")
    path = os.path.abspath(os.fspath(out))
    real = _real(path)
    for src in sources:
        if not src:
            continue
        s = _real(src)
        if _inside(real, s):
            raise OutputPathError(f"{what} {out!r} is the source {src!r} or inside it; write somewhere else")
        if _inside(s, real):
            raise OutputPathError(f"{what} {out!r} holds the source {src!r}; write somewhere else")
    if os.path.lexists(path) and not os.path.isdir(path):
        raise OutputPathError(f"{what} {out!r} exists and is not a directory")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise OutputPathError(f"{what} {out!r} exists and is not empty; pass {flag} to replace it as a whole")
    _writable_parent(path, what)
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _siblings(path: str, kind: str):
    """Hidden siblings `.NAME.KIND-PID-TOKEN` of `path` as (full path, pid)."""
    parent, name = os.path.split(path)
    prefix = f".{name}.{kind}-"
    if not os.path.isdir(parent):
        return
    for entry in os.listdir(parent):
        if entry.startswith(prefix):
            pid = entry[len(prefix):].split("-", 1)[0]
            if pid.isdigit():
                yield os.path.join(parent, entry), int(pid)


def clean_stale(path: str) -> None:
    """Remove temporary siblings left by killed writers (their process is gone). An old folder moved aside by the
    two-rename fallback is put back when the target itself is missing."""
    path = os.path.abspath(path)
    for old, pid in list(_siblings(path, _OLD)):
        if _pid_alive(pid) and pid != os.getpid():
            continue
        if not os.path.lexists(path):
            os.rename(old, path)
        else:
            shutil.rmtree(old, ignore_errors=True)
    for tmp, pid in list(_siblings(path, _PARTIAL)):
        if not _pid_alive(pid) or pid == os.getpid():
            shutil.rmtree(tmp, ignore_errors=True)


_RENAME_EXCHANGE = 2
_libc = None


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = _libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    return rc == 0


def _move_into_place(tmp: str, out: str) -> None:
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    if _exchange(tmp, out):  # tmp now holds the old folder
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.{_OLD}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(out: str, *, overwrite: bool = False, sources=(), what: str = "output directory"):
    """Yield a fresh temporary sibling of `out` to fill; on success it replaces `out` (see the module docstring).
    On an exception the temporary folder is removed and `out` is untouched."""
    path = check_output_dir(out, overwrite=overwrite, sources=sources, what=what)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    clean_stale(path)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.{_PARTIAL}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
        # Re-check: another writer may have filled `out` meanwhile.
        check_output_dir(path, overwrite=overwrite, sources=sources, what=what)
        _move_into_place(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

"""Checks of Orbax checkpoint folders, so a broken one is named in one line instead of a TensorStore traceback.

`check_pytree_dir(path)` checks the structure before a restore (the `_METADATA` tree, the OCDBT manifests, every
data file present, readable and non-empty); `restore_errors(path)` turns whatever the restore itself raises (a
truncated or missing data file, a manifest naming a file that is gone) into `BrokenCheckpointError` naming the
folder and the reason. Used by orbax_io.load_orbax (converted directories) and the trainer (step folders).
"""

from __future__ import annotations

import contextlib
import json
import os
import re

from omni_jax.checkpoint.assign import CheckpointError

METADATA = "_METADATA"


class BrokenCheckpointError(CheckpointError):
    """A checkpoint folder that is incomplete or corrupt (half-written, truncated or deleted files)."""


def short_reason(e: BaseException, limit: int = 200) -> str:
    """One line from an exception: its type and the first line of its message, without TensorStore specs."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = re.sub(r"\s*See full TensorStore details.*", "", text)
    text = re.sub(r"\s*\[tensorstore_spec=.*", "", text)
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def check_pytree_dir(path: str) -> None:
    """Raise BrokenCheckpointError unless `path` looks like a complete Orbax PyTree checkpoint."""
    if not os.path.isdir(path):
        raise BrokenCheckpointError(f"{path}: checkpoint folder missing")
    meta_path = os.path.join(path, METADATA)
    if not os.path.isfile(meta_path):
        raise BrokenCheckpointError(f"{path}: {METADATA} missing (half-written or damaged checkpoint)")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise BrokenCheckpointError(f"{path}: {METADATA} unreadable ({short_reason(e)})") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("tree_metadata"), dict) or not meta["tree_metadata"]:
        raise BrokenCheckpointError(f"{path}: {METADATA} has no tree_metadata (damaged checkpoint)")
    if meta.get("use_ocdbt", True):
        if not os.path.isfile(os.path.join(path, "manifest.ocdbt")):
            raise BrokenCheckpointError(f"{path}: manifest.ocdbt missing (half-written or damaged checkpoint)")
        for root, _dirs, files in os.walk(path):
            rel = os.path.relpath(root, path)
            if os.path.basename(rel) != "d" and not rel.startswith("ocdbt.process_"):
                continue
            for fn in files:
                fp = os.path.join(root, fn)
                try:
                    size = os.path.getsize(fp)
                    with open(fp, "rb") as f:
                        f.read(1)
                except OSError as e:
                    raise BrokenCheckpointError(f"{path}: data file {os.path.relpath(fp, path)} unreadable "
                                                f"({short_reason(e)})") from e
                if size == 0:
                    raise BrokenCheckpointError(f"{path}: data file {os.path.relpath(fp, path)} is empty "
                                                f"(half-written or damaged checkpoint)")


@contextlib.contextmanager
def restore_errors(path: str):
    """Re-raise any failure of the Orbax restore inside as one BrokenCheckpointError naming `path` (the original
    exception is chained: `omni-jax ... --debug` prints it)."""
    try:
        yield
    except CheckpointError:
        raise
    except Exception as e:  # tensorstore / orbax raise bare Exception, ValueError, FileNotFoundError, ...
        raise BrokenCheckpointError(f"{path}: checkpoint data unreadable ({short_reason(e)}); the folder may be "
                                    f"damaged or half-written") from e


def restore_newest_intact(manager, restore, *, items: tuple[str, ...] = ("state",)):
    """Restore the newest intact step of an Orbax CheckpointManager.

    restore(step) -> result runs the restore. Steps are tried newest first; a step whose PyTree items (`items`,
    sub-folders of the step) fail `check_pytree_dir` or whose restore fails is passed over. Once an older step
    restores, the broken newer ones are moved aside to `<step>.broken` (kept for inspection, out of the manager's
    way so those steps can be saved again). When no step restores nothing is moved and BrokenCheckpointError
    names every step (a model that no longer matches its checkpoints fails the same way on all of them).
    Returns (step or None when there are no steps, result, [(skipped step, one-line reason), ...])."""
    from omni_jax import paths

    skipped = []
    for step in sorted(manager.all_steps(), reverse=True):
        step_dir = paths.join(str(manager.directory), str(step))
        try:
            for item in items if not paths.is_url(step_dir) else ():  # files of a bucket: the restore tells
                check_pytree_dir(os.path.join(step_dir, item))
            with restore_errors(step_dir):
                result = restore(step)
        except BrokenCheckpointError as e:
            skipped.append((int(step), str(e)))
            continue
        import jax

        for bad, _ in skipped if jax.process_index() == 0 and not paths.is_url(step_dir) else ():
            # one process moves local broken steps aside; the others wait below
            bad_dir = os.path.join(os.fspath(manager.directory), str(bad))
            aside, n = bad_dir + ".broken", 1
            while os.path.exists(aside):
                n += 1
                aside = f"{bad_dir}.broken{n}"
            os.rename(bad_dir, aside)
        if skipped:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils

                multihost_utils.sync_global_devices("omni_jax: broken checkpoint steps moved aside")
            manager.reload()
        return int(step), result, skipped
    if skipped:
        raise BrokenCheckpointError(f"no intact checkpoint in {manager.directory}: "
                                    + "; ".join(f"step {s}: {why}" for s, why in skipped)
                                    + " (move the folder away to start afresh)")
    return None, None, skipped

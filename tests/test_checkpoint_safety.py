"""Checkpoint writes that cannot mix or destroy, broken checkpoints skipped, dtypes kept as stored.

- atomic_dir: a failed write leaves the target untouched; --overwrite replaces the folder as a whole.
- kill tests: `omni-jax convert` SIGKILLed at random points of its write never leaves a target that does not
  load; with --overwrite the previous target is intact (and loads) until the new one is complete.
- `train` on a workdir whose newest step is corrupt resumes from the previous step (bit-exact losses) and says so
  (slow; the resume rule itself is tested fast on a CheckpointManager of small trees).
- `convert` without --dtype keeps bf16 tensors bit-identical (HF -> HF and HF -> Orbax -> HF) and says so in
  config.json.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import ml_dtypes
import numpy as np
import pytest

from omni_jax import cli
from omni_jax.checkpoint import hf as hf_io
from omni_jax.checkpoint import orbax_io
from omni_jax.checkpoint.safe_write import OutputPathError, atomic_dir
from omni_jax.checkpoint.validate import BrokenCheckpointError
from omni_jax.train import loop as L

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BF16 = np.dtype(ml_dtypes.bfloat16)


def _tensors(path):
    return {k: np.array(v) for k, v in hf_io.iter_checkpoint(path)}


def _same(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)


def test_atomic_dir_replaces_whole_or_not_at_all(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputPathError, match="not empty; pass --overwrite"):
        with atomic_dir(str(out)):
            pass
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_dir(str(out), overwrite=True) as tmp:
            open(os.path.join(tmp, "new.txt"), "w").write("new")
            raise RuntimeError("boom")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["old.txt"]  # untouched, no leftovers
    # A partial folder of a killed writer (dead pid) is removed by the next write.
    stale = tmp_path / ".out.partial-999999999-deadbeef"
    stale.mkdir()
    with atomic_dir(str(out), overwrite=True) as tmp:
        open(os.path.join(tmp, "new.txt"), "w").write("new")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["new.txt"]  # replaced, not merged
    with pytest.raises(OutputPathError, match="is the source"):
        with atomic_dir(str(out), overwrite=True, sources=(str(out),)):
            pass


@pytest.fixture(scope="module")
def bf16_dir(tiny_hf_dir, tmp_path_factory):
    """The tiny fixture model stored in bfloat16 (sharded)."""
    out = str(tmp_path_factory.mktemp("bf16") / "model")
    assert cli.main(["convert", "--model", tiny_hf_dir, "--out", out, "--to", "hf", "--dtype", "bfloat16",
                     "--max-shard-size", "100KB"]) == 0
    return out


def test_convert_keeps_stored_dtype(bf16_dir, tmp_path):
    src = _tensors(bf16_dir)
    assert {v.dtype for v in src.values()} == {BF16}
    hf_out, orb, back = str(tmp_path / "hf"), str(tmp_path / "orb"), str(tmp_path / "back")
    assert cli.main(["convert", "--model", bf16_dir, "--out", hf_out, "--to", "hf"]) == 0
    assert _same(_tensors(hf_out), src)
    assert json.load(open(os.path.join(hf_out, "config.json")))["dtype"] == "bfloat16"
    assert cli.main(["convert", "--model", bf16_dir, "--out", orb, "--to", "orbax"]) == 0
    assert json.load(open(os.path.join(orb, "config.json")))["dtype"] == "bfloat16"
    assert json.load(open(os.path.join(orb, orbax_io.META)))["param_dtype"] == "bfloat16"
    assert cli.main(["convert", "--model", orb, "--out", back, "--to", "hf"]) == 0
    assert _same(_tensors(back), src)


def test_streamed_hf_convert_checks_the_checkpoint(bf16_dir, tmp_path):
    """HF -> HF is streamed without building the model, but a tensor missing, misshapen or unknown is still an
    error naming it, and nothing is written."""
    from omni_jax.checkpoint import safetensors_io as S
    from omni_jax.checkpoint.assign import CheckpointError

    src = _tensors(bf16_dir)
    gone = sorted(k for k in src if ".mlp.experts.3." in k)[0]
    tensors = {k: v for k, v in src.items() if k != gone}
    bad = tmp_path / "bad"
    bad.mkdir()
    S.write_file(str(bad / "model.safetensors"), {**tensors, "thinker.model.extra.weight": src[gone]})
    for fn in os.listdir(bf16_dir):
        if not fn.endswith(".safetensors") and not fn.endswith(".index.json"):
            shutil.copy(os.path.join(bf16_dir, fn), bad / fn)
    with pytest.raises(CheckpointError, match=r"(?s)missing.*items \[3\] of 8.*unexpected.*thinker.model.extra"):
        hf_io.convert_hf(str(bad), str(tmp_path / "out"))
    assert sorted(os.listdir(tmp_path)) == ["bad"]


# A child that runs `omni-jax convert` with each write step slowed down and announced ("W" on stdout), so the
# parent can SIGKILL it at a random point of the write.
CHILD = r"""
import sys, time
from omni_jax import cli
from omni_jax.checkpoint import orbax_io, safetensors_io as S

def slow(fn, pause):
    def wrapped(*a, **k):
        print("W", flush=True)
        out = fn(*a, **k)
        time.sleep(pause)
        return out
    return wrapped

S.write_file = slow(S.write_file, 0.03)
orbax_io._write_orbax_files = slow(orbax_io._write_orbax_files, 0.3)
sys.exit(cli.main(sys.argv[1:]))
"""


def _kill_during_write(argv, window_s, rng):
    """Start the child, SIGKILL it a random time in [0, window_s) after its first write. False if it finished."""
    p = subprocess.Popen([sys.executable, "-c", CHILD, *argv], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         text=True, cwd=REPO)
    first = p.stdout.readline()
    assert first.strip() == "W", f"child ended before writing (exit {p.wait()})"
    time.sleep(rng.uniform(0, window_s))
    p.send_signal(signal.SIGKILL)
    return p.wait() == -signal.SIGKILL


def test_sigkill_during_convert_never_leaves_a_broken_target(tiny_hf_dir, bf16_dir, tmp_path):
    rng = random.Random()
    fp32, bf16 = _tensors(tiny_hf_dir), _tensors(bf16_dir)
    # 1. A fresh HF target: after the kill it is absent or complete.
    fresh = str(tmp_path / "fresh")
    killed = _kill_during_write(["convert", "--model", bf16_dir, "--out", fresh, "--to", "hf",
                                 "--max-shard-size", "50KB"], 1.5, rng)
    assert killed
    assert not os.path.exists(fresh) or _same(_tensors(fresh), bf16)
    # 2. --overwrite of an existing HF export (fp32) with the bf16 model: the target is the old model or the new
    #    one, never a mix, and it always loads.
    target = str(tmp_path / "target")
    assert cli.main(["convert", "--model", tiny_hf_dir, "--out", target, "--to", "hf",
                     "--max-shard-size", "300KB"]) == 0
    _kill_during_write(["convert", "--model", bf16_dir, "--out", target, "--to", "hf", "--overwrite",
                        "--max-shard-size", "50KB"], 1.5, rng)
    got = _tensors(target)
    assert _same(got, fp32) or _same(got, bf16)
    hf_io.load_hf(target, dtype=None)
    # 3. --overwrite of an Orbax folder: the old one loads until the new one is in place.
    orb = str(tmp_path / "orb")
    assert cli.main(["convert", "--model", tiny_hf_dir, "--out", orb, "--to", "orbax"]) == 0
    _kill_during_write(["convert", "--model", bf16_dir, "--out", orb, "--to", "orbax", "--overwrite"], 1.0, rng)
    model, _ = orbax_io.load_orbax(orb)
    assert json.load(open(os.path.join(orb, orbax_io.META)))["param_dtype"] in ("float32", "bfloat16")
    del model
    # The next write cleans up what the killed writers left and completes.
    assert cli.main(["convert", "--model", bf16_dir, "--out", target, "--to", "hf", "--overwrite"]) == 0
    assert _same(_tensors(target), bf16)
    assert not [x for x in os.listdir(tmp_path) if x.startswith(".target.")]


TEXT = ["--config.toy.tasks=text", "--config.data.audio_slots=0", "--config.data.image_slots=0",
        "--config.data.seq_len=32", "--config.train.export=false", "--config.train.async_checkpoint=false"]


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [(m["step"], m["loss"]) for m in map(json.loads, f) if "loss" in m]


def test_restore_newest_intact_step(tmp_path):
    """The trainer's resume rule on a real CheckpointManager with small trees (fast; the full run is the slow test
    below): a damaged newest step is passed over and moved aside; all damaged: one error naming each, nothing
    moved."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from omni_jax.checkpoint.validate import restore_newest_intact

    tree = {"w": jnp.arange(4000, dtype=jnp.float32), "b": jnp.ones((3,))}
    mngr = ocp.CheckpointManager(str(tmp_path / "ck"), options=ocp.CheckpointManagerOptions(create=True))
    for step in (1, 2, 3):
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(jax_tree_scale(tree, step))))
    mngr.wait_until_finished()

    def restore(step):
        return mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(tree)))["state"]

    data = sorted(glob.glob(str(tmp_path / "ck" / "3" / "state" / "ocdbt.process_*" / "d" / "*")),
                  key=os.path.getsize)[-1]
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    os.remove(tmp_path / "ck" / "2" / "state" / "_METADATA")
    step, got, skipped = restore_newest_intact(mngr, restore)
    assert step == 1 and [s for s, _ in skipped] == [3, 2]
    assert "checkpoint data unreadable" in skipped[0][1] and "_METADATA missing" in skipped[1][1]
    np.testing.assert_array_equal(np.asarray(got["w"]), np.arange(4000) * 1.0)
    assert sorted(os.listdir(tmp_path / "ck")) == ["1", "2.broken", "3.broken"] and mngr.all_steps() == [1]
    os.remove(tmp_path / "ck" / "1" / "state" / "_METADATA")
    with pytest.raises(BrokenCheckpointError, match=r"no intact checkpoint .*step 1: .*_METADATA missing"):
        restore_newest_intact(mngr, restore)
    assert sorted(os.listdir(tmp_path / "ck")) == ["1", "2.broken", "3.broken"]
    mngr.close()


def jax_tree_scale(tree, k):
    return {name: v * k for name, v in tree.items()}


@pytest.mark.slow
def test_train_resumes_from_newest_intact_step(tmp_path, caplog):
    cfg = os.path.join(REPO, "configs/toy.py:quick")
    wd = str(tmp_path / "wd")
    L.train(cfg, wd, TEXT, progress=False)  # 6 steps, checkpoints at 3 and 6
    full = _losses(wd)
    data = sorted(glob.glob(os.path.join(wd, "checkpoints", "6", "state", "ocdbt.process_*", "d", "*")),
                  key=os.path.getsize)[-1]
    with open(data, "r+b") as f:  # the newest step is damaged
        f.truncate(os.path.getsize(data) // 2)
    with caplog.at_level(logging.WARNING, logger="omni_jax.train"):
        out = L.train(cfg, wd, TEXT, progress=False)
    assert out["status"] == "done" and out["skipped_broken_steps"] == [6]
    assert any("skipped broken checkpoint step 6" in r.getMessage() and "checkpoints/6" in r.getMessage()
               for r in caplog.records)
    assert _losses(wd) == full  # steps 4..6 retrained from step 3: the same losses bit for bit
    assert os.path.isdir(os.path.join(wd, "checkpoints", "6.broken"))  # kept for inspection
    assert os.path.isdir(os.path.join(wd, "checkpoints", "6"))  # saved again

    # Every step broken: nothing is moved, one error names them.
    os.remove(os.path.join(wd, "checkpoints", "6", "state", "_METADATA"))
    os.remove(os.path.join(wd, "checkpoints", "3", "state", "_METADATA"))
    with pytest.raises(BrokenCheckpointError, match=r"no intact checkpoint .*step 6: .*_METADATA missing.*step 3"):
        L.train(cfg, wd, TEXT, progress=False)
    assert sorted(os.listdir(os.path.join(wd, "checkpoints"))) == ["3", "6", "6.broken", "omni_jax_layout.json"]

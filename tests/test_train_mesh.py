"""Mesh training: the toy config trained on 8 simulated CPU devices under three meshes gives the per-step losses of
the single-device run, with the parameters and optimizer state really sharded, Orbax resume onto the mesh, the
`omni-jax train --mesh` option, a clear error for a batch that does not split over the batch axes, and talker
training (train.task=talker) on data=2,expert=4.

The 8-device run is tests/train_8dev.py in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=8
(this process already initialised jax with one CPU device).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

HERE = os.path.dirname(__file__)
MESHES = ("data=2,expert=4", "fsdp=4,tensor=2", "expert=8")
# 8 host devices; cheaper LLVM passes cut the compile time by ~30% (every run in the subprocess, the
# single-device reference included, is compiled the same way)
XLA_FLAGS = ("--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
             "--xla_llvm_disable_expensive_passes=true")


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    env = dict(os.environ, XLA_FLAGS=XLA_FLAGS, JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, os.path.join(HERE, "train_8dev.py"), str(tmp_path_factory.mktemp("mesh"))],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.abs(b)))


def test_mesh_losses_equal_single_device(eight):
    """Per-step loss, gradient norm and router z-loss on each mesh vs one device, relative error <= 1e-6 (fp32;
    measured <= 2.2e-7, eval loss 3.8e-8: the same math summed in another order). A sharding bug (a wrong
    all-reduce, a batch split twice, experts misrouted) would move them by far more."""
    ref = eight["none"]
    assert ref["step"] == [1, 2, 3, 4]
    assert ref["loss"][-1] < ref["loss"][0] - 0.3  # it trains
    for spec in MESHES:
        r = eight[spec]
        assert r["step"] == [1, 2, 3, 4], spec
        for key in ("loss", "grad_norm", "z_loss"):
            assert _rel(r[key], ref[key]) <= 1e-6, (spec, key, r[key], ref[key])
    # eval under the mesh (data=2,expert=4 ran the final eval): same loss over the eval set
    assert _rel(eight["data=2,expert=4"]["eval_loss"], ref["eval_loss"]) <= 1e-6


def test_parameters_and_optimizer_state_are_sharded(eight):
    """The run cannot pass by running replicated: expert weights (and their Adam moments) are split over the
    `expert` axis, or over fsdp x tensor on the FSDP mesh; the batch is split over `data`."""
    want = {"data=2,expert=4": "P('expert', None, None)", "fsdp=4,tensor=2": "P(None, 'tensor', 'fsdp')",
            "expert=8": "P('expert', None, None)"}
    for spec, expert in want.items():
        r = eight[spec]
        assert r["expert"] == expert and r["expert_mu"] == expert, (spec, r)
        assert r["num_devices"] == 8
    assert eight["fsdp=4,tensor=2"]["embed"] == "P('tensor', 'fsdp')"  # vocab over tensor, embed over fsdp
    assert eight["data=2,expert=4"]["batch_spec"] == "P(None, 'data')"  # positions [3, B, T]: B over data
    # the steps were traced under sharding.activate: MoE layers took the expert-parallel path exactly where the
    # mesh has an expert axis (4 MoE layers per traced forward)
    assert eight["none"]["ep_traces"] == 0 and eight["fsdp=4,tensor=2"]["ep_traces"] == 0
    assert eight["data=2,expert=4"]["ep_traces"] >= 4 and eight["expert=8"]["ep_traces"] >= 4


def test_cli_mesh_export_and_resume_on_mesh(eight):
    assert eight["fsdp=4,tensor=2"]["rc"] == 0
    assert eight["data=2,expert=4"]["export_equal"]  # export/ from sharded arrays = the trained weights
    # expert=8: steps 1-2 by one run, 3-4 by a new Trainer restored from the step-2 checkpoint (the resumed
    # steps equal the single-device ones, so the optimizer state and data position came back intact)
    assert eight["expert=8"]["status"] == "done"
    # a single-device checkpoint resumed on expert=8: its metrics rows 1-2 kept, 3-4 from the mesh
    ref, cross = eight["none"], eight["none->expert=8"]
    assert cross["step"] == [1, 2, 3, 4]
    for key in ("loss", "grad_norm", "z_loss"):
        assert _rel(cross[key], ref[key]) <= 1e-6, (key, cross[key], ref[key])


def test_talker_training_on_mesh(eight):
    """train.task=talker (configs/toy.py:talker, 4 steps, thinker frozen) on data=2,expert=4 vs one device, the
    mesh run stopped after step 2 and resumed from its Orbax checkpoint in a new Trainer: per-step total loss,
    talker_ce and mtp_ce within 1e-6 relative (measured <= 3.7e-7), eval losses after step 4 within 1e-6
    (measured <= 3.3e-7) and eval accuracies equal, the talker's expert weights and their Adam moments split
    over `expert`, the talker batch split over `data` on its example dim, and the talker MoE layers traced
    expert-parallel."""
    ref, r = eight["talker"]["none"], eight["talker"]["data=2,expert=4"]
    assert ref["step"] == r["step"] == [1, 2, 3, 4]
    assert ref["status"] == r["status"] == "done"
    assert ref["talker_ce"][-1] < ref["talker_ce"][0]  # it trains
    for key in ("loss", "talker_ce", "mtp_ce"):
        assert _rel(r[key], ref[key]) <= 1e-6, (key, r[key], ref[key])
    assert ref["eval"]["eval_examples"] == r["eval"]["eval_examples"] > 0
    for key in ("eval_loss", "eval_mtp_loss"):
        assert _rel(r["eval"][key], ref["eval"][key]) <= 1e-6, (key, r["eval"], ref["eval"])
    for key in ("eval_c0_accuracy", "eval_code_accuracy", "eval_frame_accuracy", "eval_exact_match"):
        assert r["eval"][key] == ref["eval"][key], (key, r["eval"], ref["eval"])
    assert r["expert"] == r["expert_mu"] == "P('expert', None, None)" and r["num_devices"] == 8, r
    assert r["batch_spec"] == {"positions": "P(None, 'data')", "talker_positions": "P('data',)",
                               "codec_codes": "P('data',)"}, r["batch_spec"]
    assert ref["ep_traces"] == 0 and r["ep_traces"] >= 2  # the tiny talker has 2 MoE layers


def test_batch_not_divisible_by_batch_axes(eight):
    err = eight["bad_batch_error"]
    assert err is not None and "global batch of 4 examples" in err and "data x fsdp = 8" in err, err


def test_cli_bad_rules_and_mesh_spec(tmp_path, capsys):
    """Bad --rules / --mesh values are one-line errors before anything is built."""
    from omni_jax import cli

    config = os.path.join(os.path.dirname(HERE), "configs/toy.py:quick")
    assert cli.main(["train", "--config", config, "--workdir", str(tmp_path / "a"), "--rules", "zero3"]) == 2
    assert "--rules 'zero3': unknown sharding rules" in capsys.readouterr().err
    assert cli.main(["train", "--config", config, "--workdir", str(tmp_path / "b"), "--mesh", "expert=3"]) == 2
    assert "multiply to 3 but there are 1 devices" in capsys.readouterr().err

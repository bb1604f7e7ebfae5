"""Training: loss/aux-loss parity with transformers, freezing, exact resume after SIGKILL, bad inputs, events,
fine-tune from an HF directory and export back to HF (transformers reproduces the logits)."""

import json
import os
import subprocess
import sys

import hf_fixtures
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from omni_jax.checkpoint.assign import CheckpointError
from omni_jax.config import ConfigError
from omni_jax.train import data as D
from omni_jax.train import events
from omni_jax.train import loop as L
from omni_jax.train import step as TS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Text-only toy data (no encoders in the graph: fast compiles) for the loop tests.
TEXT = ["--config.toy.tasks=text", "--config.data.audio_slots=0", "--config.data.image_slots=0",
        "--config.data.seq_len=32", "--config.train.export=false"]


def _cfg(*extra):
    return L.apply_overrides(L.load_config_file(os.path.join(REPO, "configs/toy.py:quick")), [*TEXT, *extra])


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]


def test_loss_and_aux_loss_match_transformers():
    """CE over labelled tokens + router_aux_loss_coef * load-balancing loss, right-padded batch with a mask."""
    _, model, batch, (_, _, loss_mask), out = hf_fixtures.thinker_loss_case(0, 20, [20, 14, 9], target_start=5)
    loss, m = TS.thinker_loss(model, batch, TS.LossConfig())
    # measured: |diff| ~ 1e-6 on a loss of 8.5 (float32 sums in a different order)
    np.testing.assert_allclose(float(m["aux_loss"]), float(out.aux_loss), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(out.loss), rtol=1e-5)
    assert float(m["target_tokens"]) == loss_mask[:, 1:].sum()


def test_freeze_patterns_keep_parameters_bit_identical(tmp_path):
    cfg = _cfg("--config.train.freeze=^thinker\\.model\\.layers\\.[01]\\.,lm_head")
    tr = L.Trainer(cfg, str(tmp_path), progress=False)
    before = {k: np.asarray(v) for k, v in nnx.to_flat_state(nnx.state(tr.model, nnx.Param))}
    tr.run()
    after = dict(nnx.to_flat_state(nnx.state(tr.merged_model(), nnx.Param)))
    frozen = [k for k in before if TS.is_frozen(k, tr.patterns)]
    assert frozen and len(frozen) < len(before)
    assert any(".".join(map(str, k)).startswith("thinker.lm_head") for k in frozen)
    for k in frozen:
        np.testing.assert_array_equal(np.asarray(after[k]), before[k], err_msg=str(k))
    # the thinker's text parameters (encoders get no text grads; the toy model's talker takes no part in the loss)
    text = [k for k in before if k[:2] in (("thinker", "model"), ("thinker", "lm_head")) and k not in frozen]
    changed = [k for k in text if not np.array_equal(np.asarray(after[k]), before[k])]
    assert len(changed) > 0.5 * len(text), (len(changed), len(text))


def test_freeze_presets_and_bad_pattern():
    assert TS.is_frozen(("thinker", "model", "norm", "scale"), TS.freeze_patterns("s1_adapters"))
    assert not TS.is_frozen(("thinker", "audio_tower", "proj1", "kernel"), TS.freeze_patterns("s1_adapters"))
    assert TS.is_frozen(("thinker", "audio_tower", "layers", 0, "fc1", "kernel"), TS.freeze_patterns("s1_adapters"))
    assert not TS.is_frozen(("thinker", "visual", "merger", "ln_q", "scale"), TS.freeze_patterns("s1_adapters"))
    assert TS.is_frozen(("talker", "model", "x"), TS.freeze_patterns("thinker_only"))
    with pytest.raises(TS.TrainConfigError, match="not a valid regex"):
        TS.freeze_patterns("thinker(")


def test_resume_after_sigkill_is_bit_exact(tmp_path):
    """An uninterrupted 6-step run vs one SIGKILLed right after its step-3 checkpoint and resumed."""
    common = [*TEXT, "--config.train.async_checkpoint=true"]
    full = str(tmp_path / "full")
    L.train(os.path.join(REPO, "configs/toy.py:quick"), full, common, progress=False)
    cut = str(tmp_path / "cut")
    cmd = [sys.executable, "-m", "omni_jax.cli", "train", "--config", os.path.join(REPO, "configs/toy.py:quick"),
           "--workdir", cut, "--no-progress", *common, "--config.train.debug_sigkill_at=3"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    assert r.returncode == -9, r.stderr[-2000:]
    assert [m["step"] for m in _metrics(cut)] == [1, 2, 3]
    out = L.train(os.path.join(REPO, "configs/toy.py:quick"), cut, common, progress=False)
    assert out["status"] == "done"
    a = [(m["step"], m["loss"], m["grad_norm"]) for m in _metrics(full) if "loss" in m]
    b = [(m["step"], m["loss"], m["grad_norm"]) for m in _metrics(cut) if "loss" in m]
    assert [s for s, *_ in a] == [1, 2, 3, 4, 5, 6]
    assert a == b  # bit for bit (float32 values written with repr precision)

    # Preemption: a real SIGTERM (sent by the process to itself after step 2, as a TPU VM's preemption notice
    # would arrive) makes the run save a checkpoint at that step and exit cleanly; the resumed run matches too.
    term = str(tmp_path / "term")
    r = subprocess.run([*cmd[:cmd.index("--workdir") + 1], term, *cmd[cmd.index("--workdir") + 2:-1],
                        "--config.train.debug_sigterm_at=2"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["status"] == "preempted" and res["step"] == 2
    assert "SIGTERM" in r.stderr and [m["step"] for m in _metrics(term)] == [1, 2]
    assert sorted(int(x) for x in os.listdir(os.path.join(term, "checkpoints")) if x.isdigit())[-1] == 2
    L.train(os.path.join(REPO, "configs/toy.py:quick"), term, common, progress=False)
    assert [(m["step"], m["loss"], m["grad_norm"]) for m in _metrics(term) if "loss" in m] == a

    # Checkpoints of an older parameter layout (no layout marker) are refused with a clear error, not resumed.
    os.remove(os.path.join(term, "checkpoints", "omni_jax_layout.json"))
    with pytest.raises(CheckpointError, match="parameter layout 1"):
        L.train(os.path.join(REPO, "configs/toy.py:quick"), term, [*common, "--config.train.steps=8"], progress=False)


def test_bf16_compute_keeps_fp32_master_weights(tmp_path):
    """loss.compute_dtype=bfloat16: the forward runs in bf16 (its losses differ from fp32 by bf16 rounding, not
    more), the optimizer updates fp32 parameters."""
    runs = {}
    for dt in ("float32", "bfloat16"):
        t = L.Trainer(_cfg(f"--config.loss.compute_dtype={dt}"), str(tmp_path / dt), progress=False)
        out = t.run()
        runs[dt] = [m["loss"] for m in _metrics(str(tmp_path / dt)) if "loss" in m]
        assert out["status"] == "done"
        assert {x.dtype for x in jax.tree.leaves(t.state["params"])} == {jnp.dtype(jnp.float32)}
    f32, b16 = np.array(runs["float32"]), np.array(runs["bfloat16"])
    assert np.all(np.isfinite(b16)) and len(b16) == 6
    assert not np.array_equal(f32, b16)  # the bf16 forward really ran
    np.testing.assert_allclose(b16[0], f32[0], rtol=2e-2)  # same initial weights: bf16 rounding only


def test_bad_records_are_counted_and_skipped(tmp_path, caplog):
    good = {"messages": [{"role": "user", "content": "What is 1 plus 2?"}, {"role": "assistant", "content": "3"}]}
    lines = [json.dumps(good)] * 20
    lines[3] = '{"messages": [ this is not json'
    lines[7] = json.dumps({"messages": [{"role": "user", "content": "no reply"}]})
    lines[11] = json.dumps({"messages": [{"role": "user", "content": [{"type": "audio", "path": "nope.wav"}]},
                                         {"role": "assistant", "content": "x"}]})
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    cfg = _cfg(f"--config.data.train_file={path}", "--config.toy.enabled=false", "--config.train.steps=6",
               "--config.data.max_bad_fraction=0.5")  # 24 good records: the whole first epoch is read
    with caplog.at_level("WARNING", logger="omni_jax.train.data"):
        out = L.Trainer(cfg, str(tmp_path / "w"), progress=False).run()
    assert out["bad_records"] >= 3  # each bad line once per epoch read (the second epoch has begun)
    text = caplog.text
    assert "line 4" in text and "malformed JSON" in text
    assert "line 8" in text and "last message must be the assistant" in text
    assert "line 12" in text and "not found" in text
    # Over the threshold: an error naming the counts.
    cfg = _cfg(f"--config.data.train_file={path}", "--config.toy.enabled=false", "--config.train.steps=6",
               "--config.data.max_bad_records=1")
    with pytest.raises(D.DataError, match="too many bad records"):
        L.Trainer(cfg, str(tmp_path / "w2"), progress=False).run()


def test_bad_inputs(tmp_path):
    with pytest.raises(D.DataError, match="data file not found"):
        L.Trainer(_cfg("--config.data.train_file=/nonexistent/train.jsonl", "--config.toy.enabled=false"),
                  str(tmp_path / "w"), progress=False)
    with pytest.raises(ConfigError, match="unknown config key 'train.stpes'; did you mean steps"):
        _cfg("--config.train.stpes=5")
    with pytest.raises(ConfigError, match="unknown config key 'trian'"):
        _cfg("--config.trian.steps=5")
    with pytest.raises(ConfigError, match="bad value"):
        _cfg("--config.train.steps=five")
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(L.TrainError, match="not writable"):
        L.Trainer(_cfg(), str(blocker / "workdir"), progress=False)
    with pytest.raises(ConfigError, match="config file not found"):
        L.load_config_file(str(tmp_path / "missing.py"))
    # The CLI prints these as one line and exits with 2.
    from omni_jax.cli import main

    assert main(["train", "--workdir", str(tmp_path / "c"), "--config", os.path.join(REPO, "configs/toy.py:quick"),
                 "--config.train.stpes=1"]) == 2


def test_event_file_round_trip(tmp_path):
    w = events.EventWriter(str(tmp_path))
    w.scalars(3, {"loss": 1.5, "lr": 0.25})
    w.close()
    got = events.read_events(w.path)
    assert got[0] == (0, {}) and got[1] == (3, {"loss": 1.5, "lr": 0.25})
    assert events.crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value


def test_finetune_from_hf_and_export_to_hf(tmp_path, tiny_hf_dir):
    """--init-from an HF directory, a few steps, export (Orbax) -> `convert --to hf` -> transformers gives the
    same logits as the trained omni_jax model."""
    import torch

    from omni_jax.cli import main

    cfg = _cfg("--config.train.export=true", "--config.train.steps=3", "--config.optim.learning_rate=0.01")
    tr = L.Trainer(cfg, str(tmp_path / "ft"), init_from=tiny_hf_dir, progress=False)
    before = np.asarray(tr.model.thinker.lm_head.kernel[...])
    out = tr.run()
    assert out["status"] == "done"
    trained = tr.merged_model()
    assert not np.array_equal(np.asarray(trained.thinker.lm_head.kernel[...]), before)
    hf_out = str(tmp_path / "hf")
    assert main(["convert", "--model", str(tmp_path / "ft" / "export"), "--to", "hf", "--out", hf_out]) == 0
    hf = hf_fixtures.hf_model_from_dir(hf_out)
    ids = np.array([[500, 503, 198, 72, 101, 108, 108, 111, 501, 198, 500, 504, 198]], np.int32)
    t = ids.shape[1]
    pos = np.broadcast_to(np.arange(t, dtype=np.float32)[None, None], (3, 1, t)).copy()
    batch = jax.tree.map(jnp.asarray, dict(input_ids=ids, positions=pos, valid=np.ones((1, t), bool)))
    ours, _ = TS.thinker_logits(trained, batch)
    with torch.no_grad():
        ref = hf.thinker(input_ids=torch.tensor(ids, dtype=torch.long)).logits.numpy()
    scale = np.abs(ref).max()
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-5, atol=1e-5 * scale)

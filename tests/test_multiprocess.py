"""One training job over several processes: 2 processes x 4 CPU devices on 127.0.0.1 (gloo collectives) train the
toy config through `omni-jax train --coordinator/--num-processes/--process-id` and give the per-step losses of a
1-process 8-device run of the same config, on a `data=2,fsdp=4` and a `data=2,expert=4` mesh (the latter runs the
MoE layers' all-to-all expert dispatch, emulated on CPU). The expert job is preempted: process 1 alone gets a
SIGTERM after step 10, both processes save step 10 and exit 0, and restarting both finishes steps 11-20.

Plus in-process checks: URL-shaped paths are never made local, the per-process data rows build the same global
batches for any process count, the multi-process flags and their errors.

Runs share work: the 1-process reference trains both meshes in one process while the 2-process fsdp job runs; the
expert job's interrupted + resumed halves are compared with the uninterrupted reference; only the fsdp runs
evaluate and export (toy.n_eval=0 elsewhere: one compile less per process).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs/toy.py:quick")
# Text-only toy data, 20 steps, a global batch of 8 (splits over data x fsdp = 8), final eval on 8 examples.
OVERRIDES = ["--config.toy.tasks=text", "--config.data.audio_slots=0", "--config.data.image_slots=0",
             "--config.data.seq_len=32", "--config.data.batch_size=8", "--config.toy.n_train=64",
             "--config.toy.n_eval=8", "--config.train.steps=20", "--config.optim.total_steps=20",
             "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.ckpt_every=0",
             "--config.train.async_checkpoint=false", "--config.train.export=false"]
FAST = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
MESHES = ("data=2,fsdp=4", "data=2,expert=4")


def _env(devices: int) -> dict:
    # No persistent compilation cache: a process that loads a cached executable while its peer compiles one can
    # wait forever in their first collective (seen with jax 0.10.2 on CPU).
    return dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), JAX_PLATFORMS="cpu",
                XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {FAST}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_args(workdir: str, mesh: str, init: str) -> list[str]:
    return ["train", "--config", CONFIG, "--workdir", workdir, "--no-progress", "--mesh", mesh, "--init-from", init,
            *OVERRIDES]


def _start_job(workdir: str, mesh: str, init: str, extra: dict[int, list[str]] | None = None):
    """Two `omni-jax train` processes of one job (4 CPU devices each); extra: per-process arguments."""
    port = _free_port()
    return [subprocess.Popen([sys.executable, "-m", "omni_jax.cli", *_train_args(workdir, mesh, init), "--coordinator",
                              f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i),
                              *(extra or {}).get(i, [])],
                             env=_env(4), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for i in range(2)]


def _finish(procs) -> list[dict]:
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err[-3000:]
        outs.append({"rc": p.returncode, "result": json.loads(out.strip().splitlines()[-1]), "stderr": err})
    return outs


def _rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(x) for x in f]


def _losses(workdir: str) -> dict[int, float]:
    steps = [r["step"] for r in _rows(workdir) if "loss" in r]
    assert len(steps) == len(set(steps)), steps  # each step once: only process 0 writes
    return {r["step"]: r["loss"] for r in _rows(workdir) if "loss" in r}


REFERENCE = """
import sys
from omni_jax import cli
root, args = sys.argv[1], sys.argv[2:]
for mesh in {meshes!r}:
    wd = root + "/" + mesh.replace("=", "").replace(",", "_")
    extra = [] if "fsdp" in mesh else ["--config.toy.n_eval=0"]
    assert cli.main(["train", "--config", {config!r}, "--workdir", wd, "--no-progress", "--mesh", mesh, *args,
                     *extra]) == 0
"""


def _initial_model(out: str) -> str:
    """The toy model's initial parameters as an omni_jax Orbax directory (created eagerly here, once): every run
    starts from it with --init-from, read straight onto its shards, instead of compiling a sharded init each."""
    import jax.numpy as jnp
    from flax import nnx

    from omni_jax.checkpoint.orbax_io import save_orbax
    from omni_jax.models.omni import OmniModel
    from omni_jax.train import loop as L
    from omni_jax.train.toy import toy_model_config

    mcfg = toy_model_config()
    model = OmniModel(mcfg, dtype=jnp.float32, rngs=nnx.Rngs(0), parts=("thinker",))
    save_orbax(model, mcfg, out, copy_from=L._write_tokenizer(out + "_tokenizer", mcfg))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    init = _initial_model(str(root / "init"))
    # the 1-process 8-device reference (both meshes, one process) beside the 2-process fsdp job (with export)
    ref = subprocess.Popen([sys.executable, "-c", REFERENCE.format(meshes=MESHES, config=CONFIG),
                            str(root / "ref"), "--init-from", init, *OVERRIDES], env=_env(8), cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    fsdp = _finish(_start_job(str(root / "fsdp"), "data=2,fsdp=4", init,
                              {0: ["--config.train.export=true"], 1: ["--config.train.export=true"]}))
    _, err = ref.communicate(timeout=900)
    assert ref.returncode == 0, err[-3000:]
    # the expert job: process 1 alone gets SIGTERM after step 10; then both processes are restarted
    wd = str(root / "expert")
    no_eval = ["--config.toy.n_eval=0"]
    # beside it, a job whose processes were given different configs: both stop with an error naming it
    mismatch = _start_job(str(root / "mismatch"), "data=2,expert=4", init, {1: ["--config.optim.learning_rate=0.1"]})
    term = _finish(_start_job(wd, "data=2,expert=4", init,
                              {0: no_eval, 1: [*no_eval, "--config.train.debug_sigterm_at=10"]}))
    mismatch = [(p.wait(timeout=600), p.stderr.read()) for p in mismatch]
    term_steps = sorted(_losses(wd))
    ckpts = sorted(int(x) for x in os.listdir(os.path.join(wd, "checkpoints")) if x.isdigit())
    resumed = _finish(_start_job(wd, "data=2,expert=4", init, {0: no_eval, 1: no_eval}))
    return {"root": root, "mismatch": mismatch, "fsdp": fsdp, "term": term, "term_steps": term_steps,
            "ckpts_after_term": ckpts, "resumed": resumed}


def _rel(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in a)


def test_two_processes_train_like_one(runs):
    """Per-step losses of the 2-process job within 1e-6 (relative) of the 1-process 8-device run, on both meshes
    (measured: <= 2.1e-7 on data=2,fsdp=4). The expert job's steps 1-10 ran before the SIGTERM, 11-20 after the
    restart: all 20 match the uninterrupted reference."""
    root = runs["root"]
    ref_fsdp, ref_expert = _losses(str(root / "ref" / "data2_fsdp4")), _losses(str(root / "ref" / "data2_expert4"))
    assert sorted(ref_fsdp) == list(range(1, 21)) and ref_fsdp[20] < ref_fsdp[1] - 1.0  # it trains
    assert _rel(_losses(str(root / "fsdp")), ref_fsdp) <= 1e-6
    assert _rel(_losses(str(root / "expert")), ref_expert) <= 1e-6
    # the final eval over the per-process eval rows gives the reference's eval loss
    fsdp = runs["fsdp"][0]["result"]
    ref_eval = [r for r in _rows(str(root / "ref" / "data2_fsdp4")) if "eval_loss" in r][-1]
    assert fsdp["eval_examples"] == 8 and abs(fsdp["eval_loss"] - ref_eval["eval_loss"]) <= 1e-6 * ref_eval["eval_loss"]
    assert runs["fsdp"][1]["result"]["loss"] == fsdp["loss"]  # both processes saw the same global metrics


def test_only_process_zero_writes(runs):
    """metrics.jsonl (each step once: checked by _losses), one TensorBoard event file, the export and the example
    question written once; each process's generated files (tokenizer, toy data) in its own folder."""
    wd = runs["root"] / "fsdp"
    assert len(os.listdir(wd / "tensorboard")) == 1
    assert (wd / "export" / "params").is_dir() and (wd / "export" / "config.json").is_file()
    assert (wd / "export" / "tokenizer.json").is_file()
    res = [r["result"] for r in runs["fsdp"]]
    assert res[0]["example_question"] == str(wd / "question.json") and "example_question" not in res[1]
    assert sorted(x for x in os.listdir(wd) if x.startswith("process_")) == ["process_0", "process_1"]


def test_sigterm_to_one_process_stops_both_at_the_same_step(runs):
    term = runs["term"]
    for r in term:
        assert r["rc"] == 0 and r["result"]["status"] == "preempted" and r["result"]["step"] == 10, r["result"]
    assert "SIGTERM" in term[1]["stderr"]
    assert runs["term_steps"] == list(range(1, 11)) and runs["ckpts_after_term"] == [10]
    for r in runs["resumed"]:
        assert r["result"]["status"] == "done" and r["result"]["step"] == 20
    assert sorted(_losses(str(runs["root"] / "expert"))) == list(range(1, 21))


def test_processes_with_different_configs_stop_with_an_error(runs):
    for rc, err in runs["mismatch"]:
        assert rc == 2 and "were given different training configs" in err, err[-2000:]


# ------------------------------------------------------------------------------------------- in-process checks


def test_url_paths_are_never_made_local(tmp_path, monkeypatch):
    from omni_jax import paths
    from omni_jax.train import loop as L

    assert paths.is_url("gs://bucket/run") and not paths.is_url("/tmp/run") and not paths.is_url("run")
    assert paths.resolve("gs://bucket/run/") == "gs://bucket/run"
    assert paths.join("gs://bucket/run", "checkpoints", "omni_jax_layout.json") == \
        "gs://bucket/run/checkpoints/omni_jax_layout.json"
    monkeypatch.chdir(tmp_path)
    assert paths.resolve("run") == str(tmp_path / "run") and paths.join(str(tmp_path), "x") == str(tmp_path / "x")
    # the workdir check goes to etils.epath with the URL unchanged (no bucket here: record the calls)
    seen = []

    class Fake:
        def __init__(self, p):
            seen.append(str(p))

        def mkdir(self, **kw):
            pass

        def write_text(self, text):
            pass

        def unlink(self):
            pass

    monkeypatch.setattr(paths.epath, "Path", Fake)
    L.check_workdir(paths.resolve("gs://bucket/run"))
    assert seen == ["gs://bucket/run", "gs://bucket/run/.write_test.0"]
    assert not os.path.exists(tmp_path / "gs:")  # nothing made in the working directory
    local = L.local_dir("gs://bucket/run")  # generated tokenizer / toy data: a local temporary folder
    assert os.path.isdir(local) and "gs:" not in local
    assert L.local_dir(str(tmp_path)) == str(tmp_path)  # one process, local workdir: the workdir itself


def test_process_rows_build_the_same_global_batches(tmp_path):
    """Two processes' rows [0, 4) and [4, 8) of each global batch of 8 concatenate to the 1-process batches, a bad
    record leaves an empty row in place (it shifts nothing), and a restored iterator continues exactly."""
    from omni_jax.processing.tiny_tokenizer import write_tiny_tokenizer
    from omni_jax.processing.tokenizer import Tokenizer
    from omni_jax.train import data as D
    from omni_jax.train.toy import toy_model_config

    write_tiny_tokenizer(str(tmp_path / "tok"))
    tok, cfg = Tokenizer.from_dir(str(tmp_path / "tok")), toy_model_config()
    lines = [json.dumps({"messages": [{"role": "user", "content": f"What is {i} plus 1?"},
                                      {"role": "assistant", "content": str(i + 1)}]}) for i in range(20)]
    lines[5] = "not json"
    (tmp_path / "t.jsonl").write_text("\n".join(lines) + "\n")
    c = D.DataConfig(seq_len=32, batch_size=8, num_threads=1, prefetch=2)

    def batches(rows, n=3, start=None):
        it = D.TrainIterator(str(tmp_path / "t.jsonl"), tok, cfg, c, rows=rows)
        if start is not None:
            it.restore(start)
        return it, [next(it) for _ in range(n)]

    one_it, one = batches(None)
    a, b = batches((0, 4))[1], batches((4, 8))[1]
    for k in range(3):
        for key in one[k]:
            np.testing.assert_array_equal(np.concatenate([a[k][key], b[k][key]]), one[k][key])
    assert one_it.filter.bad == 1 and int((~one[0]["valid"].any(1)).sum() + (~one[1]["valid"].any(1)).sum()
                                         + (~one[2]["valid"].any(1)).sum()) == 1  # one empty row for the bad line
    state = batches(None, n=1)[0].state()
    assert state == {"batches": 1, "seen": [8], "bad": [int(one[0]["valid"].any(1).sum() < 8)]}
    _, again = batches((4, 8), n=2, start=state)
    np.testing.assert_array_equal(again[0]["input_ids"], one[1]["input_ids"][4:])
    # sharding -> rows: on one device every row is this process's
    assert D.process_rows(None, 8) == (0, 8)


def test_distributed_flags_and_errors(capsys):
    from omni_jax import cli
    from omni_jax import distributed as dist

    with pytest.raises(dist.DistributedError, match="go together"):
        dist.initialize("127.0.0.1:1234", None, None)
    with pytest.raises(dist.DistributedError, match="not in 0..1"):
        dist.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(dist.DistributedError, match="not HOST:PORT"):
        dist.initialize("127.0.0.1", 2, 0)
    assert dist.initialize() == 1  # a plain machine: one process, nothing to wait for
    assert dist.cluster_detected({}) is None
    assert dist.cluster_detected({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1", "SLURM_PROCID": "0"}) is None
    assert dist.cluster_detected({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4", "SLURM_PROCID": "2"}) == "slurm"
    assert dist.cluster_detected({"TPU_WORKER_HOSTNAMES": "a,b,c,d", "TPU_SKIP_MDS_QUERY": "1"}) == "tpu"
    assert cli.main(["train", "--workdir", "/tmp/x", "--coordinator", "h:1", "--num-processes", "2"]) == 2
    assert "go together" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--coordinator HOST:PORT", "--num-processes N", "--process-id I", "TRAINING.md"):
        assert flag in text, flag


def test_launchers_quote_arguments(tmp_path):
    """launch/tpu_pod.sh copies the checkout to every worker, installs it, then runs `omni-jax train` on all workers
    with the arguments exactly as given (a fake `gcloud` records its calls; the remote command is then run by bash
    as the workers' shells would, with a fake `omni-jax`); launch/gpu_host.sh passes its arguments through."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    (bin_dir / "gcloud").write_text(f"#!{sys.executable}\nimport json, sys\n"
                                    f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n")
    (bin_dir / "omni-jax").write_text(f"#!{sys.executable}\nimport json, sys\nprint(json.dumps(sys.argv[1:]))\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    args = ["--config", "configs/toy.py", r"--config.train.freeze=^thinker\.(audio_tower|visual)\.", "--mesh",
            "data=2,fsdp=16", "--config.model.init_from=gs://b/a dir/it's"]
    r = subprocess.run(["bash", os.path.join(REPO, "launch/tpu_pod.sh"), "pod", "zone-a", "gs://b/run", *args],
                       env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    assert [c[:4] for c in calls] == [["compute", "tpus", "tpu-vm", "scp"], ["compute", "tpus", "tpu-vm", "ssh"],
                                      ["compute", "tpus", "tpu-vm", "ssh"]]
    assert all("--worker=all" in c for c in calls)
    install, run = calls[1][calls[1].index("--command") + 1], calls[2][calls[2].index("--command") + 1]
    assert "pip install" in install and "jax\\[tpu\\]==0.10.2" in install
    (tmp_path / "omni_jax").mkdir()
    got = subprocess.run(["bash", "-c", run], env=dict(env, HOME=str(tmp_path)), capture_output=True, text=True)
    assert json.loads(got.stdout) == ["train", "--workdir", "gs://b/run", *args], got.stderr
    got = subprocess.run(["bash", os.path.join(REPO, "launch/gpu_host.sh"), "/shared/run", *args], env=env,
                         capture_output=True, text=True)
    assert json.loads(got.stdout) == ["train", "--workdir", "/shared/run", *args], got.stderr

"""Every subcommand with malformed input: exit status 2, one line on stderr naming the problem, no traceback, and
no file created, changed or removed anywhere in the sandbox (the named output included).

The cases run in process through `omni_jax.cli.main(argv)` (fast); two run as real subprocesses. CASES lists them
by class: outputs that would mix or destroy, broken checkpoints, bad output paths, bad numbers, bad names, malformed
files. `{root}` is the sandbox (built once for the module):

  model/        the tiny random HF model of the `tiny_hf_dir` fixture, in one model.safetensors
  orbax/        the same model converted to Orbax
  full/         a non-empty folder (an earlier sharded export: index + shards)
  stale/        the model with a left-over index of another checkpoint next to model.safetensors
  badcfg/ badidx/ typcfg/   the model with malformed config.json / index JSON / a string where a size goes
  nometa/ trunc/ nodata/ emptied/   Orbax copies with _METADATA removed / a data file truncated / the data
                files removed / a data file emptied
  msgs.json     a valid messages file; latin1.json: not UTF-8; afile: a plain file; sub/: an empty folder
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest

from omni_jax import cli

M = ["generate", "--model", "{root}/model", "--messages", "{root}/msgs.json"]
TRAIN = ["train", "--config", "configs/toy.py:quick", "--no-progress"]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (id, argv, needle that the one stderr line must contain)
CASES = [
    # -- writes that would mix or destroy
    ("convert-into-nonempty", ["convert", "--model", "{root}/model", "--out", "{root}/full", "--to", "hf"],
     "not empty; pass --overwrite"),
    ("convert-orbax-onto-itself", ["convert", "--model", "{root}/orbax", "--out", "{root}/orbax", "--to", "orbax",
                                   "--overwrite"], "is the source"),
    ("convert-into-source", ["convert", "--model", "{root}/model", "--out", "{root}/model/sub", "--to", "orbax"],
     "inside it"),
    ("convert-onto-parent-of-source", ["convert", "--model", "{root}/model", "--out", "{root}", "--to", "hf",
                                       "--overwrite"], "holds the source"),
    ("convert-out-is-file", ["convert", "--model", "{root}/model", "--out", "{root}/afile", "--to", "hf"],
     "is not a directory"),
    ("init-onto-file", ["init", "--out", "{root}/afile"], "is not a directory"),
    ("init-into-nonempty", ["init", "--out", "{root}/full"], "not empty"),
    ("stale-index", ["generate", "--model", "{root}/stale", "--messages", "{root}/msgs.json"],
     "holds both model.safetensors and model.safetensors.index.json"),
    # -- broken checkpoints
    ("orbax-no-metadata-generate", ["generate", "--model", "{root}/nometa", "--messages", "{root}/msgs.json"],
     "_METADATA missing"),
    ("orbax-no-metadata-convert", ["convert", "--model", "{root}/nometa", "--out", "{root}/new", "--to", "hf"],
     "_METADATA missing"),
    ("orbax-truncated-convert", ["convert", "--model", "{root}/trunc", "--out", "{root}/new", "--to", "hf"],
     "checkpoint data unreadable"),
    ("orbax-emptied-generate", ["generate", "--model", "{root}/emptied", "--messages", "{root}/msgs.json"],
     "is empty (half-written or damaged checkpoint)"),
    ("orbax-data-deleted-convert", ["convert", "--model", "{root}/nodata", "--out", "{root}/new", "--to", "hf"],
     "nodata/params"),
    ("malformed-config", ["generate", "--model", "{root}/badcfg", "--messages", "{root}/msgs.json"],
     "not a valid JSON config"),
    ("malformed-index", ["convert", "--model", "{root}/badidx", "--out", "{root}/new", "--to", "orbax"],
     "not a valid JSON index"),
    ("config-value-wrong-type", ["generate", "--model", "{root}/typcfg", "--messages", "{root}/msgs.json"],
     "hidden_size"),
    ("model-missing", ["generate", "--model", "{root}/nowhere", "--messages", "{root}/msgs.json"], "nowhere"),
    ("convert-model-missing", ["convert", "--model", "{root}/nowhere", "--out", "{root}/new", "--to", "hf"],
     "nowhere"),
    # -- outputs checked before any work
    ("speak-missing-dir", [*M, "--speak", "{root}/nodir/out.wav"], "does not exist"),
    ("speak-onto-dir", [*M, "--speak", "{root}/sub"], "is a directory"),
    ("speak-onto-dir-wav", [*M, "--speak", "{root}/sub.wav/"], "is a directory"),
    ("speak-unknown-speaker", [*M, "--speak", "{root}/out.wav", "--speaker", "Zed"], "unknown speaker 'Zed'"),
    ("speak-mp3", [*M, "--speak", "{root}/out.mp3"], "'.mp3'; use one of .wav, .flac, .ogg"),
    ("speak-no-extension", [*M, "--speak", "{root}/out"], "(no extension)"),
    ("train-workdir-is-file", [*TRAIN, "--workdir", "{root}/afile"], "is not a directory"),
    ("train-init-from-missing", [*TRAIN, "--workdir", "{root}/wd", "--init-from", "{root}/nowhere"], "nowhere"),
    # -- numbers
    ("talker-max-new-tokens-1", [*M, "--speak", "{root}/out.wav", "--talker-max-new-tokens", "1"],
     "--talker-max-new-tokens must be >= 2"),
    ("max-new-tokens-0", [*M, "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    ("top-k-negative", [*M, "--top-k", "-3"], "--top-k must be >= 0"),
    ("train-negative-steps", [*TRAIN, "--workdir", "{root}/wd", "--config.train.steps=-5"],
     "config.train.steps must be >= 1"),
    ("train-batch-size-0", [*TRAIN, "--workdir", "{root}/wd", "--config.data.batch_size=0"],
     "config.data.batch_size must be >= 1"),
    ("train-seq-len-0", [*TRAIN, "--workdir", "{root}/wd", "--config.data.seq_len=0"], "config.data.seq_len"),
    ("plan-negative-devices", ["plan", "--preset", "tiny", "--mesh", "expert=-1", "--devices", "-8"],
     "--devices must be >= 1"),
    ("plan-negative-cache", ["plan", "--preset", "tiny", "--mesh", "expert=2", "--batch", "-1", "--seq-len", "8"],
     "--batch must be >= 0"),
    ("plan-batch-without-seq-len", ["plan", "--preset", "tiny", "--mesh", "expert=2", "--batch", "2"],
     "--batch and --seq-len go together"),
    ("plan-mesh-zero", ["plan", "--preset", "tiny", "--mesh", "expert=0"], "must be positive or -1"),
    ("convert-bad-shard-size", ["convert", "--model", "{root}/model", "--out", "{root}/new", "--to", "hf",
                                "--max-shard-size", "lots"], "not a size"),
    ("convert-zero-shard-size", ["convert", "--model", "{root}/model", "--out", "{root}/new", "--to", "hf",
                                 "--max-shard-size", "0MB"], "must be positive"),
    # -- names
    ("plan-unknown-preset", ["plan", "--preset", "huge", "--mesh", "expert=2"], "unknown preset"),
    ("plan-unknown-part", ["plan", "--preset", "tiny", "--mesh", "expert=2", "--parts", "thinker,voice"],
     "unknown part(s) 'voice'"),
    ("plan-unknown-rules", ["plan", "--preset", "tiny", "--mesh", "expert=2", "--rules", "magic"],
     "unknown sharding rules"),
    ("generate-unknown-mesh-axis", [*M, "--mesh", "pipeline=2"], "unknown axis 'pipeline'"),
    ("init-unknown-preset", ["init", "--preset", "huge", "--out", "{root}/new"], "unknown preset"),
    ("init-non-tiny-preset", ["init", "--preset", "30b-a3b", "--out", "{root}/new"], "only fits the tiny"),
    ("train-unknown-rules", [*TRAIN, "--workdir", "{root}/wd", "--rules", "magic"], "unknown sharding rules"),
    ("train-unknown-preset", [*TRAIN, "--workdir", "{root}/wd", "--config.model.preset=huge"], "huge"),
    ("train-unknown-part", [*TRAIN, "--workdir", "{root}/wd", "--config.model.parts=('thinker','voice')"],
     "unknown part(s) 'voice'"),
    # -- malformed files
    ("messages-not-utf8", ["generate", "--model", "{root}/model", "--messages", "{root}/latin1.json"],
     "not UTF-8"),
    ("messages-is-dir", ["generate", "--model", "{root}/model", "--messages", "{root}/sub"], "sub"),
]
SUBPROCESS = ("convert-into-nonempty", "orbax-emptied-generate")


def _fmt(argv, root):
    return [x.format(root=root) for x in argv]


def _snapshot(root: str) -> dict:
    """Every path under root -> (kind, size, content hash) (directories: kind only)."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            out[os.path.relpath(os.path.join(dirpath, d), root)] = ("dir",)
        for f in filenames:
            p = os.path.join(dirpath, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = ("file", os.path.getsize(p), hashlib.md5(fh.read()).hexdigest())
    return out


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory, tiny_hf_dir):
    root = str(tmp_path_factory.mktemp("sweep"))
    assert cli.main(["convert", "--model", tiny_hf_dir, "--out", f"{root}/model", "--to", "hf",
                     "--max-shard-size", "1GB"]) == 0
    assert cli.main(["convert", "--model", f"{root}/model", "--out", f"{root}/orbax", "--to", "orbax"]) == 0
    assert cli.main(["convert", "--model", f"{root}/model", "--out", f"{root}/full", "--to", "hf",
                     "--max-shard-size", "300KB"]) == 0
    assert os.path.exists(f"{root}/full/model.safetensors.index.json")
    shutil.copytree(f"{root}/model", f"{root}/stale")
    shutil.copy(f"{root}/full/model.safetensors.index.json", f"{root}/stale/")
    for name, edit in (("badcfg", lambda p: open(p, "w").write('{"thinker_config": {')),
                       ("typcfg", None)):
        shutil.copytree(f"{root}/model", f"{root}/{name}")
        if edit is not None:
            edit(f"{root}/{name}/config.json")
    cfg = json.load(open(f"{root}/typcfg/config.json"))
    cfg["thinker_config"]["text_config"]["hidden_size"] = "wide"
    json.dump(cfg, open(f"{root}/typcfg/config.json", "w"))
    shutil.copytree(f"{root}/full", f"{root}/badidx")
    open(f"{root}/badidx/model.safetensors.index.json", "w").write('{"weight_map": {"a": ')
    for name in ("nometa", "trunc", "nodata", "emptied"):
        shutil.copytree(f"{root}/orbax", f"{root}/{name}")
    os.remove(f"{root}/nometa/params/_METADATA")
    data = sorted(glob.glob(f"{root}/trunc/params/ocdbt.process_*/d/*"), key=os.path.getsize)[-1]
    with open(data, "r+b") as f:
        f.truncate(os.path.getsize(data) // 2)
    # generate reads the thinker's arrays only, and which OCDBT file holds them is up to the writer's threads: a
    # file cut to nothing is caught on open whatever it holds
    data = sorted(glob.glob(f"{root}/emptied/params/ocdbt.process_*/d/*"), key=os.path.getsize)[-1]
    open(data, "w").close()
    for f in glob.glob(f"{root}/nodata/params/ocdbt.process_*/d/*"):
        os.remove(f)
    os.makedirs(f"{root}/model/sub")  # a folder inside the source (as a target it is refused)
    with open(f"{root}/msgs.json", "w") as f:
        json.dump([{"role": "user", "content": "Hello"}], f)
    with open(f"{root}/latin1.json", "wb") as f:
        f.write('[{"role": "user", "content": "caf\u00e9"}]'.encode("latin-1"))
    with open(f"{root}/afile", "w") as f:
        f.write("not a folder")
    os.makedirs(f"{root}/sub")
    os.makedirs(f"{root}/sub.wav")
    return root


@pytest.mark.parametrize("case", [c for c in CASES if c[0] not in SUBPROCESS], ids=lambda c: c[0])
def test_bad_input_in_process(case, sandbox, capsys):
    _, argv, needle = case
    before = _snapshot(sandbox)
    code = cli.main(_fmt(argv, sandbox))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"omni-jax {argv[0]}: error: ") and needle in lines[0], lines[0]
    assert out == ""
    assert _snapshot(sandbox) == before


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in SUBPROCESS], ids=lambda c: c[0])
def test_bad_input_subprocess(case, sandbox):
    _, argv, needle = case
    before = _snapshot(sandbox)
    r = subprocess.run([sys.executable, "-m", "omni_jax.cli", *_fmt(argv, sandbox)], capture_output=True, text=True,
                       cwd=REPO)
    lines = [x for x in r.stderr.strip().splitlines() if x.startswith("omni-jax ")]
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and len(lines) == 1 and needle in lines[0], r.stderr
    assert _snapshot(sandbox) == before


def test_debug_shows_the_raw_exception(sandbox):
    """--debug re-raises: the chained TensorStore error is visible."""
    from omni_jax.checkpoint.validate import BrokenCheckpointError

    with pytest.raises(BrokenCheckpointError) as info:
        cli.main(["convert", "--model", f"{sandbox}/trunc", "--out", f"{sandbox}/new", "--to", "hf", "--debug"])
    assert info.value.__cause__ is not None
    assert not os.path.exists(f"{sandbox}/new")


def test_speak_formats_write_float_audio(tmp_path):
    """Each --speak format soundfile writes with its subtype (wav float, flac 24-bit, ogg vorbis) and reads back."""
    import numpy as np
    import soundfile as sf

    from omni_jax.cli_checks import SPEAK_FORMATS, ArgumentError, speak_format

    wave = (0.5 * np.sin(np.arange(4800) / 7)).astype(np.float32)
    tol = {".wav": 0, ".flac": 1e-6, ".ogg": 0.1}
    for ext in SPEAK_FORMATS:
        path = str(tmp_path / f"a{ext.upper()}")  # extensions are case-insensitive
        fmt, subtype = speak_format(path)
        sf.write(path, wave, 24000, format=fmt, subtype=subtype)
        back, sr = sf.read(path, dtype="float32")
        assert sr == 24000 and back.shape == wave.shape and np.abs(back - wave).max() <= tol[ext]
    with pytest.raises(ArgumentError, match=r"'\.aiff'; use one of \.wav, \.flac, \.ogg"):
        speak_format("x.aiff")

"""`omni-jax` end to end: init -> generate, convert HF -> Orbax -> generate, and one-line errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from hf_fixtures import hf_model_from_dir

from omni_jax import cli
from omni_jax.config import TINY_TOKENS


def _messages(tmp_path, messages, name="m.json"):
    p = tmp_path / name
    p.write_text(json.dumps(messages))
    return str(p)


TEXT = [{"role": "user", "content": "Tell me a story about a cat."}]


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def hf_greedy(tiny_hf_dir):
    """HF's greedy reply (thinker stops at <|im_end|>, as Qwen3-Omni's generate does) for TEXT."""
    from omni_jax.processing import chat
    from omni_jax.processing.tokenizer import Tokenizer

    ids = chat.build_prompt(Tokenizer.from_dir(tiny_hf_dir), chat.parse_messages(TEXT))
    hf = hf_model_from_dir(tiny_hf_dir)
    with torch.no_grad():
        out = hf.thinker.generate(input_ids=torch.tensor([ids]), max_new_tokens=20, do_sample=False,
                                  eos_token_id=TINY_TOKENS["im_end"], pad_token_id=0)
    return ids, out[0, len(ids):].tolist()


def test_generate_json_matches_transformers(tiny_hf_dir, tmp_path, capsys, hf_greedy):
    code, out, _ = _run(capsys, "generate", "--model", tiny_hf_dir, "--messages", _messages(tmp_path, TEXT),
                        "--greedy", "--max-new-tokens", "20", "--json")
    assert code == 0
    res = json.loads(out)
    assert set(res) >= {"prompt_token_ids", "token_ids", "text"}
    assert res["prompt_token_ids"] == hf_greedy[0]
    assert res["token_ids"] == hf_greedy[1]


def test_convert_to_orbax_then_generate_same_tokens(tiny_hf_dir, tmp_path, capsys, hf_greedy):
    dst = str(tmp_path / "orbax")
    code, _, err = _run(capsys, "convert", "--model", tiny_hf_dir, "--out", dst, "--to", "orbax")
    assert code == 0, err
    code, out, _ = _run(capsys, "generate", "--model", dst, "--messages", _messages(tmp_path, TEXT), "--greedy",
                        "--max-new-tokens", "20", "--json")
    assert code == 0 and json.loads(out)["token_ids"] == hf_greedy[1]
    back = str(tmp_path / "hf_again")
    code, _, err = _run(capsys, "convert", "--model", dst, "--out", back, "--to", "hf")
    assert code == 0, err
    code, out, _ = _run(capsys, "generate", "--model", back, "--messages", _messages(tmp_path, TEXT), "--greedy",
                        "--max-new-tokens", "20", "--json")
    assert json.loads(out)["token_ids"] == hf_greedy[1]


def _console_script() -> str:
    """The installed `omni-jax` entry point: the one beside this interpreter, else the first on PATH."""
    exe = shutil.which("omni-jax", path=os.path.dirname(sys.executable)) or shutil.which("omni-jax")
    assert exe, "the `omni-jax` console script is not installed (pip install -e .)"
    return exe


def test_init_then_generate_console_script(tmp_path):
    """The installed console script itself (not `python -m`): a new user's first two commands."""
    exe = _console_script()
    d = str(tmp_path / "tiny")
    subprocess.run([exe, "init", "--preset", "tiny", "--out", d], check=True)
    r = subprocess.run([exe, "generate", "--model", d, "--messages", _messages(tmp_path, TEXT), "--max-new-tokens",
                        "5", "--json"], capture_output=True, text=True, check=True)
    res = json.loads(r.stdout)
    assert 1 <= len(res["token_ids"]) <= 5 and isinstance(res["text"], str)
    r = subprocess.run([exe, "generate", "--model", d, "--messages", str(tmp_path / "absent.json")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "absent.json" in r.stderr


def test_sampling_is_seeded(tiny_hf_dir, tmp_path, capsys):
    m = _messages(tmp_path, TEXT)
    args = ("generate", "--model", tiny_hf_dir, "--messages", m, "--temperature", "1.5", "--top-k", "40",
            "--top-p", "0.95", "--max-new-tokens", "12", "--json")
    a = json.loads(_run(capsys, *args, "--seed", "1")[1])["token_ids"]
    b = json.loads(_run(capsys, *args, "--seed", "1")[1])["token_ids"]
    c = json.loads(_run(capsys, *args, "--seed", "2")[1])["token_ids"]
    assert a == b and a != c


@pytest.mark.parametrize("messages, extra, needle", [
    ([{"role": "robot", "content": "hi"}], (), "role"),
    ([{"role": "user", "content": [{"type": "smell", "text": "x"}]}], (), "smell"),
    ([{"role": "user", "content": [{"type": "audio", "path": "nowhere.wav"}]}], (), "nowhere.wav"),
    (TEXT, ("--max-new-tokens", "5000"), "exceeds the model's context"),
    (TEXT, ("--temperature", "0"), "temperature"),
    (TEXT, ("--top-p", "1.5"), "top_p"),
])
def test_bad_input_gives_one_line_error(tiny_hf_dir, tmp_path, capsys, messages, extra, needle):
    code, out, err = _run(capsys, "generate", "--model", tiny_hf_dir, "--messages", _messages(tmp_path, messages),
                          *extra)
    assert code == 2 and out == ""
    assert err.startswith("omni-jax generate: error:") and needle in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3


def test_missing_messages_file(tiny_hf_dir, tmp_path, capsys):
    code, _, err = _run(capsys, "generate", "--model", tiny_hf_dir, "--messages", str(tmp_path / "none.json"))
    assert code == 2 and "not found" in err

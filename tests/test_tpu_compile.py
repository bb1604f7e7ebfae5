"""TPU without a TPU: `omni-jax plan --compile` builds the tiny model's real train step with abstract parameters
and compiles it for a v5e:2x2 slice (libtpu's compiler, from this CPU host); the kernel choices a user names are
checked up front and handed to the session (tests/test_pallas_e2e.py runs the Pallas TPU kernels end to end in
interpret mode against the defaults)."""

import json
import os
import re

import pytest

from omni_jax import cli
from omni_jax.config import preset
from omni_jax.kernels import impls
from omni_jax.plan import PlanError

JSON_KEYS = {"topology", "devices", "fits", "hbm_bytes_per_chip", "peak_bytes_per_chip", "flops", "mosaic_kernel_calls",
             "compile_seconds"}


def _run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def tiny_train_compiled(tmp_path_factory):
    """One compile shared by the tests below: fp32 compute (so the XLA attention would hold fp32 [B, H, T, T]
    scores), experts split over 2 chips (expert-parallel dispatch with ragged all-to-all)."""
    out = tmp_path_factory.mktemp("tpu_hlo")
    t = 256
    argv = ["plan", "--preset", "tiny", "--topology", "v5e:2x2", "--mesh", "fsdp=2,expert=2", "--compile", "train",
            "--batch", "2", "--seq-len", str(t), "--dtype", "float32", "--remat", "layers",
            "--freeze", r"^thinker\.(audio_tower|visual)\.", "--json", "--dump-hlo", str(out)]
    return argv, out, t


def test_train_step_compiles_for_v5e_with_mosaic_kernels(tiny_train_compiled, capsys):
    argv, out, t = tiny_train_compiled
    code, stdout, _ = _run(capsys, *argv)
    assert code == 0
    r = json.loads(stdout)
    assert JSON_KEYS <= set(r)
    assert (r["topology"], r["devices"], r["device_kind"]) == ("v5e:2x2", 4, "TPU v5 lite")
    assert r["fits"] is True and r["hbm_bytes_per_chip"] == 16 << 30
    assert 0 < r["peak_bytes_per_chip"] < r["hbm_bytes_per_chip"]
    assert r["flops"] > 0 and r["compile_seconds"] > 0
    hlo = open(os.path.join(out, "train_v5e_2x2.hlo.txt")).read()
    assert r["hlo_path"].endswith("train_v5e_2x2.hlo.txt")
    # Mosaic kernels: splash attention (forward + its backward kernels) and megablox gmm / tgmm in every layer.
    assert r["mosaic_kernel_calls"] == hlo.count('custom_call_target="tpu_custom_call"') >= 4 * 3
    # Expert parallelism on TPU sends token copies with ragged all-to-all.
    assert "ragged-all-to-all" in hlo
    # No materialised attention scores: no fp32 [..., heads, T', T] (or GQA [..., kv, group, T', T]) buffer, T' the
    # chip's share of the queries. The same compile with --attention-impl xla holds f32[1,2,2,128,256] (checked).
    c = preset("tiny").thinker_config.text_config
    assert _score_buffers(hlo, c.num_attention_heads, c.num_key_value_heads, t, min_queries=t // 4) == set()


def _score_buffers(hlo: str, heads: int, kv_heads: int, t: int, min_queries: int) -> set[str]:
    """fp32 shapes [..., heads, Q, t] or [..., kv_heads, heads / kv_heads, Q, t] with Q >= min_queries."""
    found = set()
    for m in re.finditer(r"f32\[([\d,]+)\]", hlo):
        dims = [int(d) for d in m.group(1).split(",")]
        if len(dims) >= 3 and dims[-1] == t and dims[-2] >= min_queries and (
                dims[-3] == heads or dims[-4:-2] == [kv_heads, heads // kv_heads]):
            found.add(m.group(0))
    return found


def test_plan_compile_errors_are_one_line(capsys, monkeypatch):
    code, _, err = _run(capsys, "plan", "--preset", "tiny", "--topology", "v5e:2x2", "--mesh", "fsdp=4")
    assert code == 2 and "--compile and --topology go together" in err
    code, _, err = _run(capsys, "plan", "--preset", "tiny", "--topology", "v9z:2x2", "--mesh", "fsdp=4",
                        "--compile", "train")
    assert code == 2 and err.count("\n") == 1 and "v9z:2x2" in err
    code, _, err = _run(capsys, "plan", "--preset", "tiny", "--topology", "v5e:2x2", "--mesh", "fsdp=8",
                        "--compile", "train")
    assert code == 2 and err.count("\n") == 1
    code, _, err = _run(capsys, "plan", "--preset", "tiny", "--topology", "v5e:2x2", "--mesh", "fsdp=4",
                        "--compile", "decode", "--attention-impl", "flash")
    assert code == 2 and "flash" in err and "not on tpu" in err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(PlanError, match=re.escape('pip install -e ".[tpu]"')):
        from omni_jax.plan_compile import topology_devices

        topology_devices("v5e:2x2")


def test_impl_names_match_the_kernel_tables():
    from omni_jax.kernels.attention import IMPLS as attention_impls
    from omni_jax.kernels.moe.api import IMPLS as moe_impls

    assert set(impls.MOE_IMPLS) == {"auto", *moe_impls}
    assert set(impls.ATTENTION_IMPLS) == {"auto", *attention_impls}
    assert impls.check_impl("moe", "megablox", "tpu") == "megablox"
    for kind, name, platform in (("moe", "nope", "cpu"), ("moe", "megablox", "gpu"), ("attention", "splash", "gpu"),
                                 ("attention", "cudnn", "cpu"), ("attention", "nope", "tpu")):
        with pytest.raises(impls.KernelChoiceError, match=f"--{kind}-impl"):
            impls.check_impl(kind, name, platform)


def test_generate_kernel_flags_reach_the_session(tmp_path, capsys, monkeypatch):
    """`omni-jax generate --attention-impl splash --moe-impl megablox` hands both names to OmniSession (the session
    with them gives the defaults' tokens: tests/test_pallas_e2e.py, in process); an unknown name is a one-line error
    before any model is read."""
    from omni_jax import inference

    opened = []

    class Session:  # records how the CLI opens the session; generates nothing
        def __init__(self, model_dir, **kw):
            opened.append(kw)

        def sampling(self, **kw):
            return None

        def generate(self, messages, **kw):
            return {"prompt_token_ids": [1], "token_ids": [2], "text": "x"}

    monkeypatch.setattr(inference, "OmniSession", Session)
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps([{"role": "user", "content": "count the tones: one two three"}]))
    (tmp_path / "model").mkdir()
    base = ["generate", "--model", str(tmp_path / "model"), "--messages", str(msgs), "--greedy", "--json"]
    code, out, _ = _run(capsys, *base)
    assert code == 0 and json.loads(out)["token_ids"] == [2]
    assert (opened[-1]["moe_impl"], opened[-1]["attention_impl"]) == ("auto", "auto")
    code, _, _ = _run(capsys, *base, "--attention-impl", "splash", "--moe-impl", "megablox")
    assert code == 0 and (opened[-1]["moe_impl"], opened[-1]["attention_impl"]) == ("megablox", "splash")
    code, _, err = _run(capsys, *base, "--moe-impl", "nope")
    assert code == 2 and err.count("\n") == 1 and "--moe-impl" in err and len(opened) == 2

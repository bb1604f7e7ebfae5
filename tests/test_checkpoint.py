"""Checkpoint import/export: round trips exact to the bit, and one clear report for every kind of mismatch."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from hf_fixtures import hf_model_from_dir

from omni_jax.checkpoint import hf as hf_io
from omni_jax.checkpoint import orbax_io
from omni_jax.checkpoint.assign import CheckpointError, flat_params, get_value
from omni_jax.config import ConfigError


def _tensors(path):
    return {k: np.array(v) for k, v in hf_io.iter_checkpoint(path)}


def test_hf_round_trip_is_bit_identical_and_loads_in_transformers(tiny_hf_dir, tmp_path):
    model, cfg = hf_io.load_hf(tiny_hf_dir)
    assert model.talker is not None and model.code2wav is not None
    out = tmp_path / "export"
    hf_io.save_hf(model, cfg, str(out), max_shard_bytes=300_000, copy_from=tiny_hf_dir)
    src, dst = _tensors(tiny_hf_dir), _tensors(str(out))
    assert sorted(src) == sorted(dst)
    for k in src:
        assert src[k].dtype == dst[k].dtype and np.array_equal(src[k], dst[k]), k
    assert os.path.exists(out / "model.safetensors.index.json")
    for fn in ("tokenizer.json", "chat_template.jinja", "generation_config.json"):
        assert os.path.exists(out / fn)
    hf = hf_model_from_dir(str(out))
    ref = hf_model_from_dir(tiny_hf_dir)
    ids = torch.tensor([[1, 5, 9, 200, 33]])
    with torch.no_grad():
        torch.testing.assert_close(hf.thinker(input_ids=ids).logits, ref.thinker(input_ids=ids).logits,
                                   rtol=0, atol=0)


def test_bf16_export_then_import(tiny_hf_dir, tmp_path):
    model, cfg = hf_io.load_hf(tiny_hf_dir, dtype=jnp.bfloat16, parts=("thinker",))
    hf_io.save_hf(model, cfg, str(tmp_path), copy_from=tiny_hf_dir)
    back, _ = hf_io.load_hf(str(tmp_path), dtype=jnp.bfloat16)
    assert back.talker is None  # thinker-only export writes enable_audio_output=false
    a, b = flat_params(model), flat_params(back)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(get_value(a[k])), np.asarray(get_value(b[k])))


def test_orbax_round_trip(tiny_hf_dir, tmp_path):
    model, cfg = hf_io.load_hf(tiny_hf_dir)
    orbax_io.save_orbax(model, cfg, str(tmp_path / "orb"), copy_from=tiny_hf_dir)
    assert orbax_io.is_orbax_dir(str(tmp_path / "orb"))
    back, cfg2 = orbax_io.load_orbax(str(tmp_path / "orb"))
    assert cfg2 == cfg
    a, b = flat_params(model), flat_params(back)
    assert set(a) == set(b)
    for k in a:
        np.testing.assert_array_equal(np.asarray(get_value(a[k])), np.asarray(get_value(b[k])))
    thinker_only, _ = orbax_io.load_orbax(str(tmp_path / "orb"), parts=("thinker",))
    assert thinker_only.talker is None

    # A checkpoint from before the expert layout change (no layout version: experts [E, in, out]) is refused
    # by name rather than loaded into wrongly oriented weights.
    meta_path = tmp_path / "orb" / orbax_io.META
    meta = json.loads(meta_path.read_text())
    assert meta["param_layout"] == orbax_io.PARAM_LAYOUT
    del meta["param_layout"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"parameter layout 1 \(expert weights \[E, in, out\]\)"):
        orbax_io.load_orbax(str(tmp_path / "orb"))


def test_thinker_only_directory_loads_without_talker(tiny_hf_dir_factory):
    path = tiny_hf_dir_factory("a", "v5", False)
    model, cfg = hf_io.load_hf(path)
    assert not cfg.enable_audio_output and model.talker is None and model.code2wav is None
    with pytest.raises(ValueError, match="no talker"):
        hf_io.load_hf(path, parts=("thinker", "talker"))


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_shard(tiny_hf_dir, tmp_path):
    d = _copy(tiny_hf_dir, tmp_path / "m")
    with open(os.path.join(d, hf_io.INDEX)) as f:
        victim = sorted(set(json.load(f)["weight_map"].values()))[1]
    os.remove(os.path.join(d, victim))
    with pytest.raises(CheckpointError, match=f"missing shard file.*{victim}"):
        hf_io.load_hf(d)


def _rewrite_one_shard(d, fn):
    """Apply fn(dict of tensors) -> dict to the shard holding the embedding, keeping the index consistent."""
    with open(os.path.join(d, hf_io.INDEX)) as f:
        index = json.load(f)
    shard = index["weight_map"]["thinker.model.embed_tokens.weight"]
    tensors = {k: np.array(v) for k, v in hf_io.S.iter_tensors(os.path.join(d, shard))}
    new = fn(tensors)
    hf_io.S.write_file(os.path.join(d, shard), new, {"format": "pt"})
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != shard or k in new}
    index["weight_map"].update({k: shard for k in new})
    with open(os.path.join(d, hf_io.INDEX), "w") as f:
        json.dump(index, f)


def test_shape_mismatch_unknown_and_missing_keys_reported_together(tiny_hf_dir, tmp_path):
    d = _copy(tiny_hf_dir, tmp_path / "bad")

    def corrupt(t):
        emb = t.pop("thinker.model.embed_tokens.weight")
        t["thinker.model.embed_tokens.weight"] = emb[:, :-1]  # wrong shape
        t["thinker.model.layers.0.mlp.mystery.weight"] = np.zeros((2, 2), np.float32)  # unknown key
        return t

    _rewrite_one_shard(d, corrupt)
    os.remove(os.path.join(d, "model.safetensors.index.json"))  # fall back to reading every shard
    with open(os.path.join(d, "config.json")) as f:
        cfgd = json.load(f)
    with pytest.raises(CheckpointError) as e:
        hf_io.load_hf(d)
    msg = str(e.value)
    assert "shape mismatch" in msg and "thinker.model.embed_tokens.weight" in msg
    assert "unexpected" in msg and "thinker.model.layers.0.mlp.mystery.weight" in msg
    assert cfgd["model_type"] == "qwen3_omni_moe"


def test_missing_tensor_reported(tiny_hf_dir, tmp_path):
    d = _copy(tiny_hf_dir, tmp_path / "miss")
    _rewrite_one_shard(d, lambda t: {k: v for k, v in t.items() if k != "thinker.model.embed_tokens.weight"})
    with pytest.raises(CheckpointError, match="missing.*\n.*thinker.model.embed_tokens.embedding"):
        hf_io.load_hf(d)


def test_config_weights_mismatch(tiny_hf_dir, tmp_path):
    d = _copy(tiny_hf_dir, tmp_path / "cfg")
    with open(os.path.join(d, "config.json")) as f:
        cfgd = json.load(f)
    cfgd["thinker_config"]["text_config"]["num_hidden_layers"] += 1
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfgd, f)
    with pytest.raises(CheckpointError, match="thinker.model.layers.4"):
        hf_io.load_hf(d)


def test_not_a_model_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        hf_io.load_hf(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        hf_io.load_hf(str(tmp_path / "empty"))
    shutil.copy(__file__, tmp_path / "empty" / "model.safetensors")
    with pytest.raises((ConfigError, CheckpointError)):
        hf_io.load_hf(str(tmp_path / "empty"))

"""Architecture configs: HF round trips, validation errors, and full-size shapes via jax.eval_shape."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from omni_jax import config as C
from omni_jax.models.thinker import Thinker


def _count(module) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(module, nnx.Param)))


@pytest.mark.parametrize("make", [C.tiny, C.released_30b_a3b])
def test_hf_round_trip(make):
    cfg = make()
    d = json.loads(json.dumps(cfg.to_hf()))
    assert C.OmniConfig.from_hf(d) == cfg
    assert C.OmniConfig.from_hf(d).to_hf() == d


def test_from_hf_keeps_undeclared_keys_and_reads_required_ones():
    d = C.released_30b_a3b().to_hf()
    d["thinker_config"]["some_future_key"] = 7
    cfg = C.OmniConfig.from_hf(d)
    assert cfg.thinker_config.extra["some_future_key"] == 7
    assert cfg.to_hf()["thinker_config"]["some_future_key"] == 7
    assert cfg.text.head_dim == 128  # undeclared in HF, not hidden/heads (=64)
    assert cfg.thinker_config.vision_start_token_id == 151652
    assert cfg.talker_config.speakers == {"chelsie": 2301, "ethan": 2302, "aiden": 2303}
    assert cfg.talker_config.text_config.shared_expert_intermediate_size == 768


def test_transformers_accepts_our_config():
    transformers = pytest.importorskip("transformers")
    hc = transformers.Qwen3OmniMoeConfig(**C.tiny().to_hf())
    assert hc.thinker_config.text_config.head_dim == 16
    assert hc.talker_config.text_config.shared_expert_intermediate_size == 24
    assert hc.thinker_config.vision_start_token_id == C.TINY_TOKENS["vision_start"]


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["thinker_config"]["text_config"]["rope_parameters"].update(mrope_section=[2, 2, 2]),
     "mrope_section"),
    (lambda d: d["thinker_config"].update(audio_token_id=10_000), "audio_token_id=10000 is outside the vocabulary"),
    (lambda d: d.update(im_end_token_id=999_999), "im_end_token_id"),
    (lambda d: d["thinker_config"]["text_config"].update(num_key_value_heads=3), "num_key_value_heads"),
    (lambda d: d["talker_config"].update(num_code_groups=5), "num_code_groups"),
    (lambda d: d["thinker_config"]["text_config"].update(num_experts_per_tok=99), "num_experts_per_tok"),
    (lambda d: d.update(model_type="llama"), "model_type"),
])
def test_validation_names_the_problem(mutate, message):
    d = C.tiny().to_hf()
    mutate(d)
    with pytest.raises(C.ConfigError, match=message):
        C.OmniConfig.from_hf(d)


def test_config_file_missing(tmp_path):
    with pytest.raises(C.ConfigError, match="not found"):
        C.OmniConfig.from_hf(tmp_path)


def test_unknown_preset():
    with pytest.raises(C.ConfigError, match="unknown preset"):
        C.preset("70b")


def test_released_thinker_text_parameter_count():
    """jax.eval_shape of the released thinker LM: every shape from reference §9.1, no memory allocated."""
    cfg = C.released_30b_a3b()
    thinker = nnx.eval_shape(lambda: Thinker(cfg.thinker_config, rngs=nnx.Rngs(0)))
    layer = (4096 * 2048 + 2 * 512 * 2048 + 2048 * 4096 + 2 * 128 + 2 * 2048 + 128 * 2048
             + 128 * 3 * 768 * 2048)
    expected = 2 * 152064 * 2048 + 2048 + 48 * layer
    text_params = _count(thinker.model) + _count(thinker.lm_head)
    assert text_params == expected == 30_532_646_912
    layer0 = thinker.model.layers[0]
    assert layer0.self_attn.q_proj.kernel.shape == (2048, 4096)
    assert layer0.mlp.experts.gate_proj.shape == (128, 768, 2048)  # torch Linear layout [out, in] per expert
    assert layer0.mlp.experts.down_proj.shape == (128, 2048, 768)


def test_frozen_and_hashable():
    cfg = C.tiny()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.enable_audio_output = False
    assert hash(cfg.text) == hash(C.tiny().text)


def test_released_full_model_parameter_count_and_tensor_count():
    """The whole released checkpoint: 35,259,818,545 parameters in 28,010 on-disk tensors (reference §1, §9.1)."""
    from omni_jax.checkpoint import keys as K
    from omni_jax.checkpoint.assign import flat_params
    from omni_jax.models.omni import OmniModel

    model = nnx.eval_shape(lambda: OmniModel(C.released_30b_a3b(), rngs=nnx.Rngs(0)))
    assert _count(model) == 35_259_818_545
    parts = {"thinker.model": 30_221_219_840, "thinker.lm_head": 311_427_072, "thinker.audio_tower": 647_927_168,
             "thinker.visual": 538_631_408, "talker": 3_324_596_480, "code2wav": 216_016_577}
    for name, n in parts.items():
        obj = model
        for a in name.split("."):
            obj = getattr(obj, a)
        assert _count(obj) == n, name
    tensors = 0
    rules = K.all_rules()
    for path, var in flat_params(model).items():
        rule = next(r for r in rules if r.ours_re.match(path))
        tensors += var.shape[0] if rule.stack_names else 1
    assert tensors == 28_010

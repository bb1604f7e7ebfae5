"""Parity of the talker, its shared-expert MoE block, the code predictor and the sampling warpers against
transformers 5.23 (fp32, every tensor re-initialised with random values of random scale)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from sampling_stats import ALPHA, chi2_pvalue, expected_probs

from omni_jax import config as C
from omni_jax.checkpoint.assign import load_tensors
from omni_jax.models.talker import Talker
from omni_jax.sampling import filter_logits, sample_logits

transformers = pytest.importorskip("transformers")
from transformers.generation.logits_process import (  # noqa: E402
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.models.qwen3_omni_moe import modeling_qwen3_omni_moe as M  # noqa: E402
from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeTalkerConfig  # noqa: E402


def second_talker_config() -> C.TalkerConfig:
    """Different widths, head_dim, expert count/top-k, norm_topk_prob=False, G=6, small code vocab."""
    text = C.TalkerTextConfig(vocab_size=3072, hidden_size=48, intermediate_size=56, num_hidden_layers=3,
                              num_attention_heads=4, num_key_value_heads=1, head_dim=12, rope_theta=1e4,
                              mrope_section=(2, 2, 2), moe_intermediate_size=20, num_experts=6, num_experts_per_tok=3,
                              norm_topk_prob=False, shared_expert_intermediate_size=40)
    cp = C.CodePredictorConfig(vocab_size=96, hidden_size=48, intermediate_size=40, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=12, rope_theta=1e4,
                               num_code_groups=6)
    return C.TalkerConfig(text_config=text, code_predictor_config=cp, num_code_groups=6, thinker_hidden_size=40,
                          codec_eos_token_id=2150, codec_pad_id=2148, codec_bos_id=2149, codec_nothink_id=2155,
                          codec_think_bos_id=2156, codec_think_eos_id=2157, speaker_id=(("ethan", 2302),))


CONFIGS = {"tiny": lambda: C.tiny().talker_config, "second": second_talker_config}


def randomize(module: torch.nn.Module, seed: int):
    """Every tensor: random values at a random per-tensor scale (norm weights around a random level)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = float(torch.empty(()).uniform_(0.5, 2.0, generator=g))
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 or name.endswith("norm.weight"):
                level = 1.0 if "norm" in name else 0.0
                p.copy_(scale * (level + 0.3 * noise))
            elif "embedding" in name:
                p.copy_(scale * noise)
            else:
                p.copy_(scale * noise / np.sqrt(p.shape[-1]))


_PAIRS: dict = {}


def _pair(name: str):
    """(config, transformers talker, ours, name) of one config, built once per session."""
    if name not in _PAIRS:
        cfg = CONFIGS[name]()
        torch.manual_seed(0)
        hf = M.Qwen3OmniMoeTalkerForConditionalGeneration(Qwen3OmniMoeTalkerConfig(**cfg.to_hf())).eval().float()
        randomize(hf, seed=1 if name == "tiny" else 2)
        ours = nnx.eval_shape(lambda: Talker(cfg, rngs=nnx.Rngs(0)))  # abstract: load_tensors fills every weight
        load_tensors(ours, {f"talker.{k}": v.numpy() for k, v in hf.state_dict().items()}, root="talker")
        _PAIRS[name] = (cfg, hf, ours, name)
    return _PAIRS[name]


@pytest.fixture(scope="module", params=list(CONFIGS))
def pair(request):
    return _pair(request.param)


def _positions(rs, b, t):
    base = np.arange(t)[None].repeat(b, 0)
    return np.stack([base, base + rs.randint(0, 5, (b, t)), rs.randint(0, 40, (b, t))]).astype(np.int64)


def test_talker_forward(pair):
    cfg, hf, ours, name = pair
    rs = np.random.RandomState(0)
    b, t, h = 2, 9, cfg.text_config.hidden_size
    x = rs.randn(b, t, h).astype(np.float32)
    pos = _positions(rs, b, t)
    with torch.no_grad():
        ref_logits = hf(inputs_embeds=torch.tensor(x), position_ids=torch.tensor(pos), use_cache=False).logits.numpy()
        ref_hidden = hf.model(inputs_embeds=torch.tensor(x), position_ids=torch.tensor(pos),
                              use_cache=False).last_hidden_state.numpy()
    call = nnx.jit(lambda m, *a: m(*a))
    mask = jnp.tril(jnp.ones((t, t), bool))[None]
    logits, hidden, cache = call(ours, jnp.asarray(x), jnp.asarray(pos, jnp.int32), mask)
    assert cache is None
    np.testing.assert_allclose(np.asarray(hidden), ref_hidden, rtol=1e-5, atol=1e-5 * np.abs(ref_hidden).max())
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())

    # Prefill t-1 rows into a static cache, then decode the last row: same hidden/logits as the full forward.
    if name != "tiny":
        return  # the cache path is config-independent; one config keeps the compile count down
    from omni_jax.serving.engine import empty_cache

    tc = cfg.text_config
    s = t + 3
    cache = empty_cache(tc, b, s, jnp.float32)  # the engines' stacked form: (k, v) of [L, B, S, KV, D]
    _, _, cache = call(ours, jnp.asarray(x[:, :-1]), jnp.asarray(pos[:, :, :-1], jnp.int32),
                       jnp.tril(jnp.ones((t - 1, t - 1), bool))[None], cache)
    step_mask = jnp.broadcast_to((jnp.arange(s) <= t - 1)[None, None], (b, 1, s))
    lg, hd, _ = call(ours, jnp.asarray(x[:, -1:]), jnp.asarray(pos[:, :, -1:], jnp.int32), step_mask, cache,
                     jnp.full((b,), t - 1, jnp.int32))
    np.testing.assert_allclose(np.asarray(hd[:, 0]), ref_hidden[:, -1], rtol=1e-5,
                               atol=1e-5 * np.abs(ref_hidden).max())
    np.testing.assert_allclose(np.asarray(lg[:, 0]), ref_logits[:, -1], rtol=1e-5,
                               atol=1e-5 * np.abs(ref_logits).max())


def test_shared_expert_moe_block(pair):
    cfg, hf, ours, _ = pair
    x = np.random.RandomState(1).randn(3, 5, cfg.text_config.hidden_size).astype(np.float32)
    with torch.no_grad():
        ref = hf.model.layers[1].mlp(torch.tensor(x)).numpy()
    got, _, _ = ours.model.layers[1].mlp(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    # the shared expert matters: dropping it changes the output
    no_shared = ref - np.asarray(jax.nn.sigmoid(ours.model.layers[1].mlp.shared_expert_gate(jnp.asarray(x)))
                                 * ours.model.layers[1].mlp.shared_expert(jnp.asarray(x)))
    assert np.abs(no_shared - ref).max() > 1e-2 * np.abs(ref).max()


def test_projections(pair):
    cfg, hf, ours, _ = pair
    x = np.random.RandomState(2).randn(2, 4, cfg.thinker_hidden_size).astype(np.float32)
    for name in ("text_projection", "hidden_projection"):
        with torch.no_grad():
            ref = getattr(hf, name)(torch.tensor(x)).numpy()
        got = np.asarray(getattr(ours, name)(jnp.asarray(x)))
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_code_predictor_greedy_matches_generate(pair):
    """Several frames' inputs (batch rows) through HF generate vs one jitted predict_frame."""
    cfg, hf, ours, _ = pair
    g = cfg.num_code_groups
    rs = np.random.RandomState(10)
    b, h = 6, cfg.text_config.hidden_size
    h_last = rs.randn(b, h).astype(np.float32)
    c0 = rs.randint(0, 2048, (b,))
    with torch.no_grad():
        c0_embed = hf.model.codec_embedding(torch.tensor(c0)).numpy()
        out = hf.code_predictor.generate(inputs_embeds=torch.tensor(np.stack([h_last, c0_embed], 1)),
                                         max_new_tokens=g - 1, do_sample=False, output_logits=True,
                                         return_dict_in_generate=True)
    ref_codes = out.sequences.numpy()
    ref_logits = torch.stack(out.logits, 1).numpy()
    np.testing.assert_allclose(np.asarray(ours.embed_codes(jnp.asarray(c0))), c0_embed, rtol=0, atol=0)
    fn = nnx.jit(lambda m, hl, ce: m.code_predictor.predict_frame(hl, ce, greedy=True, return_logits=True))
    codes, logits = fn(ours, jnp.asarray(h_last), jnp.asarray(c0_embed))
    assert codes.shape == (b, g - 1) and ref_codes.shape == (b, g - 1)
    np.testing.assert_array_equal(np.asarray(codes), ref_codes)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())

    # Next talker input (codec part): Σ of all G codebook embeddings, as HF's prepare_inputs_for_generation.
    with torch.no_grad():
        cp_emb = hf.code_predictor.get_input_embeddings()
        ref_sum = torch.tensor(c0_embed) + sum(cp_emb[i](torch.tensor(ref_codes[:, i])) for i in range(g - 1))
    got_sum = ours.next_frame_embedding(jnp.asarray(c0), codes)
    np.testing.assert_allclose(np.asarray(got_sum), ref_sum.numpy(), rtol=1e-5, atol=1e-5 * ref_sum.abs().max())


def test_code_predictor_sampling():
    """Sampling plumbing is config-independent: the tiny config only (saves compiles)."""
    cfg, _, ours, _ = _pair("tiny")
    rs = np.random.RandomState(5)
    h_last = jnp.asarray(rs.randn(4, cfg.text_config.hidden_size).astype(np.float32))
    c0e = ours.embed_codes(jnp.asarray(rs.randint(0, 2048, (4,))))
    run = nnx.jit(lambda m, hl, ce, key, greedy, top_k, top_p: m.code_predictor.predict_frame(
        hl, ce, greedy=greedy, rng=key, top_k=top_k, top_p=top_p), static_argnames=("greedy", "top_k", "top_p"))
    greedy = run(ours, h_last, c0e, jax.random.PRNGKey(0), greedy=True, top_k=50, top_p=0.8)
    # top_k=1 keeps only the argmax: sampling must reproduce greedy
    k1 = run(ours, h_last, c0e, jax.random.PRNGKey(3), greedy=False, top_k=1, top_p=None)
    np.testing.assert_array_equal(np.asarray(k1), np.asarray(greedy))
    # The first residual code over N identical rows (independent draws) follows the filtered softmax of its
    # logits (the talker's top_k=50, top_p=0.8): chi-square at significance ALPHA, fixed seed.
    n = 8192
    rows = lambda a: jnp.broadcast_to(a[:1], (n, a.shape[1]))  # noqa: E731
    codes, logits = nnx.jit(lambda m, hl, ce, key: m.code_predictor.predict_frame(
        hl, ce, greedy=False, rng=key, top_k=50, top_p=0.8, return_logits=True))(
        ours, rows(h_last), rows(c0e), jax.random.PRNGKey(7))
    assert codes.shape == (n, cfg.code_predictor_config.num_code_groups - 1)
    probs = expected_probs(np.asarray(logits[0, 0]), 1.0, 50, 0.8)
    counts = np.bincount(np.asarray(codes[:, 0]), minlength=probs.shape[0])
    assert counts[probs == 0].sum() == 0 and chi2_pvalue(counts, probs) > ALPHA
    flat = np.where(probs > 0, expected_probs(np.asarray(logits[0, 0]), 1.6), 0.0)  # power: other temperature
    assert chi2_pvalue(counts, flat / flat.sum()) < 1e-6
    cp = ours.code_predictor
    with pytest.raises(ValueError, match="rng"):
        cp.predict_frame(h_last, c0e, greedy=False)


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 50, 0.8), (0.9, 50, None), (0.7, 5, 0.5),
                                                     (1.0, None, 0.3), (1.3, 300, 0.95)])
def test_filter_logits_matches_hf_warpers(temperature, top_k, top_p):
    rs = np.random.RandomState(0)
    logits = (rs.randn(6, 256) * 3).astype(np.float32)
    logits[0, 10:20] = logits[0].max() + 1.0  # ties at the top (top-k keeps every tie)
    logits[1, :60] = 2.5  # ties around the k-th value
    scores = torch.tensor(logits)
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    ref = scores.numpy()
    got = np.asarray(filter_logits(jnp.asarray(logits), temperature, top_k, top_p))
    # Rows 0-1 hold exact ties: which tied entries top-p drops depends on the sort order (torch.sort is not
    # stable), so for them only the number of survivors must agree; rows 2-5 must agree entry by entry.
    np.testing.assert_array_equal(np.isneginf(got).sum(-1), np.isneginf(ref).sum(-1))
    np.testing.assert_array_equal(np.isneginf(got)[2:], np.isneginf(ref)[2:])
    if top_p is None:
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(ref))
    keep = ~np.isneginf(ref)
    keep[:2] &= ~np.isneginf(got[:2])
    np.testing.assert_allclose(got[keep], ref[keep], rtol=1e-6)
    ids = sample_logits(jnp.asarray(logits), jax.random.PRNGKey(0), temperature, top_k, top_p)
    assert (~np.isneginf(got))[np.arange(6), np.asarray(ids)].all()

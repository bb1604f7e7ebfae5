"""Speech output for a batch of requests against transformers 5.23 `Qwen3OmniMoeForConditionalGeneration.generate(
input_ids=<left-padded batch>, attention_mask=..., return_audio=True)` on the tiny random checkpoint (fp32, greedy
thinker / talker / code predictor).

Captured from HF: the talker's `generate` kwargs (left-padded prompt rows with their mask, per-row trailing text
rows), the talker's sequences, the codes given to `code2wav.chunked_decode` (zeroed past each row's EOS) and the
returned list of per-row waveforms.

The thinker of the random model never emits <|im_end|> by itself, and its talker never emits codec EOS within a
few steps. Both are forced deterministically, with the same edit to both models: <|im_end|>'s lm_head row becomes
1.5 x the row of a token that one batch row generates at step 2 (so that row stops there: the reference's per-row
EOS re-marking of the trailing text rows is exercised), and codec EOS's codec_head row becomes 1.5 x the row of a
code one row samples mid-way (so rows stop the talker at different steps). The test asserts that the edits had
those effects before comparing.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from hf_fixtures import hf_model_from_dir

from omni_jax.config import TINY_TOKENS
from omni_jax.inference import OmniSession
from omni_jax.models.thinker import TextModel
from omni_jax.processing import chat
from omni_jax.speech import SpeechError, talker_sampling

THINKER_TOKENS = 6
TALKER_TOKENS = 10
IM_END, PAD = TINY_TOKENS["im_end"], TINY_TOKENS["endoftext"]
WAV_ATOL = 1e-3  # SnakeBeta amplifies fp32 rounding (as tests/test_speech.py)
CONVS = [  # three prompt lengths (21, 22 and 30 tokens)
    [{"role": "user", "content": "Tell me a story about a cat."}],
    [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Hi"}],
    [{"role": "user", "content": "What is the weather like on Mars today, please?"}],
]


@pytest.fixture(scope="module")
def session(tiny_hf_dir):
    # the talker's two layers (and thinker layers 2-3) run as one lax.scan over the stacked KV cache (as the
    # released model's): the codes and waveforms below equal transformers'
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TextModel, "scan_min_layers", 2)
        session = OmniSession(tiny_hf_dir, speech=True)
    assert session.engine.thinker.runs == {2: 4} and session.engine.speech.talker.runs == {0: 2}
    return session


@pytest.fixture(scope="module")
def hf(tiny_hf_dir):
    return hf_model_from_dir(tiny_hf_dir)


@pytest.fixture(scope="module")
def prompts(session):
    return [session.prompt(chat.parse_messages(c)).input_ids for c in CONVS]


@pytest.fixture(scope="module")
def base(hf, prompts):
    """HF's batch on the unedited models."""
    return hf_batch(hf, prompts)


def hf_batch(hf, prompts):
    """HF batched generate with audio output (left padding with the pad token, attention mask), greedy."""
    p = max(map(len, prompts))
    ids = torch.full((len(prompts), p), PAD)
    mask = torch.zeros((len(prompts), p), dtype=torch.long)
    for i, row in enumerate(prompts):
        ids[i, p - len(row):], mask[i, p - len(row):] = torch.tensor(row), 1
    cap = {}
    gen, decode = hf.talker.generate, hf.code2wav.chunked_decode

    def talker_generate(**kw):
        cap["kw"] = kw
        out = gen(**kw)
        cap["sequences"] = out.sequences.numpy()
        return out

    def chunked_decode(codes, **kw):
        cap["codes"] = codes.numpy().copy()
        return decode(codes, **kw)

    hf.talker.generate, hf.code2wav.chunked_decode = talker_generate, chunked_decode
    try:
        with torch.no_grad():
            seq, wavs = hf.generate(input_ids=ids, attention_mask=mask, return_audio=True,
                                    thinker_max_new_tokens=THINKER_TOKENS, thinker_eos_token_id=IM_END,
                                    thinker_do_sample=False, talker_do_sample=False,
                                    talker_max_new_tokens=TALKER_TOKENS, speaker="ethan")
    finally:
        del hf.talker.generate, hf.code2wav.chunked_decode  # back to the class methods
    cap["generated"] = seq[:, p:].numpy()
    cap["wavs"] = [w.numpy() for w in wavs]
    eos = hf.config.talker_config.codec_eos_token_id
    seqs = cap["sequences"]
    cap["code_lengths"] = [int(np.argmax(s == eos)) if (s == eos).any() else seqs.shape[1] for s in seqs]
    return cap


def check_batch(session, hf, cap, outs, tps):
    """Per row: thinker tokens, talker prompt rows / ids / trailing text, codec tokens, frames, waveform."""
    kw = cap["kw"]
    eos = session.cfg.talker_config.codec_eos_token_id
    errs = {"prompt": 0.0, "trailing": 0.0, "wav": 0.0}
    for i, (out, tp) in enumerate(zip(outs, tps)):
        ref_gen = cap["generated"][i]
        n = len(out["token_ids"])
        assert out["token_ids"] == ref_gen[:n].tolist()
        assert n == len(ref_gen) or out["token_ids"][-1] == IM_END  # HF pads a finished row (with its EOS)

        valid = kw["attention_mask"][i].numpy().astype(bool)  # user rows right-aligned, then 9 assistant rows
        ref = kw["inputs_embeds"][i].numpy()[valid]
        scale = np.abs(ref).max()
        assert tp.embeds.shape == ref.shape
        np.testing.assert_allclose(tp.embeds, ref, rtol=1e-5, atol=1e-5 * scale)
        np.testing.assert_array_equal(tp.ids, kw["talker_input_ids"][i].numpy()[valid])
        ref_trail = kw["trailing_text_hidden"][i].numpy()
        assert tp.trailing.shape == ref_trail.shape
        np.testing.assert_allclose(tp.trailing, ref_trail, rtol=1e-5, atol=1e-5 * scale)
        errs["prompt"] = max(errs["prompt"], np.abs(tp.embeds - ref).max() / scale)
        errs["trailing"] = max(errs["trailing"], np.abs(tp.trailing - ref_trail).max() / scale)

        length = cap["code_lengths"][i]
        seq = cap["sequences"][i]
        assert out["codec_tokens"] == seq[:len(out["codec_tokens"])].tolist()
        assert out["codec_finished"] == (length < len(seq))
        if out["codec_finished"]:
            assert out["codec_tokens"][-1] == eos and len(out["codec_tokens"]) == length + 1
        np.testing.assert_array_equal(out["codes"], cap["codes"][i][:, :length])
        assert out["waveform"].shape == cap["wavs"][i].shape and out["waveform"].dtype == np.float32
        np.testing.assert_allclose(out["waveform"], cap["wavs"][i], rtol=0, atol=WAV_ATOL)
        errs["wav"] = max(errs["wav"], float(np.abs(out["waveform"] - cap["wavs"][i]).max(initial=0)))
    return errs


def run_batch(session, convs):
    return session.speak_batch([chat.parse_messages(c) for c in convs], max_new_tokens=THINKER_TOKENS,
                               sampling=session.sampling(greedy=True), talker_max_new_tokens=TALKER_TOKENS,
                               talker=talker_sampling(greedy=True))


def rebuild_prompts(session, prompts, outs):
    """The talker prompts of a batch, rebuilt through the public pieces (engine requests returning the prompt's
    hidden states, the fed-back tokens' input embeddings, talker_prompts)."""
    from omni_jax.serving.protocol import Request

    k = session.cfg.talker_config.accept_hidden_layer
    engine = session.engine
    fins = [engine.run(Request(chat.parse_messages(c), max_new_tokens=THINKER_TOKENS,
                               sampling=session.sampling(greedy=True), return_hidden=True))[-1] for c in CONVS]
    assert [f.token_ids for f in fins] == [o["token_ids"] for o in outs]
    steps = max(len(f.token_ids) for f in fins)
    rows = []
    for p, f in zip(prompts, fins):
        fed = engine.thinker.embed_tokens(np.asarray(f.token_ids[:min(len(f.token_ids), steps - 1)], np.int32))
        rows.append((np.concatenate([f.hidden[0][:len(p)], fed]),
                     np.concatenate([f.hidden[k][:len(p)], np.zeros_like(fed)])))
    return session.speech.talker_prompts(prompts, [f.token_ids for f in fins], [r[0] for r in rows],
                                         [r[1] for r in rows], speaker="Ethan")


def test_batch_matches_transformers(session, hf, prompts, base):
    """Three prompts of different lengths, every row running all thinker steps and all talker steps."""
    cap = base
    outs = run_batch(session, CONVS)
    tps = rebuild_prompts(session, prompts, outs)
    assert all(len(o["token_ids"]) == THINKER_TOKENS for o in outs)
    assert all(o["num_codec_frames"] == TALKER_TOKENS - 1 and not o["codec_finished"] for o in outs)
    check_batch(session, hf, cap, outs, tps)


def _edit_row(session_state, hf_weight, name, col, src):
    """Set output `col` of a linear to 1.5 x output `src`, in our state (kernel [in, out]) and HF's ([out, in]).
    Returns (new state, saved HF weight)."""
    new = jax.tree_util.tree_map_with_path(
        lambda p, x: x.at[:, col].set(1.5 * x[:, src]) if name in jax.tree_util.keystr(p) else x, session_state)
    saved = hf_weight.detach().clone()
    with torch.no_grad():
        hf_weight[col] = 1.5 * hf_weight[src]
    return new, saved


def test_early_thinker_eos_and_talker_eos_match_transformers(session, hf, prompts, base):
    """One row's thinker stops at step 2 with <|im_end|> (trailing text: its EOS projection, tts_eos, tts_pad)
    while the others run all 6 steps; rows stop the talker at their own codec EOS at different steps."""
    row, step = 2, 2
    target = int(base["generated"][row, step])
    assert target not in base["generated"][row, :step]
    gen, sg = session.engine.thinker, session.speech
    old_thinker, old_talker = gen.state, sg.state
    lm_head, codec_head = hf.thinker.lm_head.weight, hf.talker.codec_head.weight
    eos = session.cfg.talker_config.codec_eos_token_id
    saved = []
    try:
        gen.state, s = _edit_row(gen.state, lm_head, "lm_head", IM_END, target)
        saved.append((lm_head, s))
        mid = hf_batch(hf, prompts)  # thinker edited: pick a codec code one row samples mid-way
        gen_lens = [int(np.argmax(g == IM_END)) + 1 if (g == IM_END).any() else len(g) for g in mid["generated"]]
        assert gen_lens[row] == step + 1 and max(gen_lens) == THINKER_TOKENS  # row stops early, others do not
        code = int(mid["sequences"][0, 4])
        sg.state, s = _edit_row(sg.state, codec_head, "codec_head", eos, code)
        saved.append((codec_head, s))
        cap = hf_batch(hf, prompts)
        outs = run_batch(session, CONVS)
        tps = rebuild_prompts(session, prompts, outs)
    finally:
        gen.state, sg.state = old_thinker, old_talker
        with torch.no_grad():
            for w, s in saved:
                w.copy_(s)
    lens = [len(o["token_ids"]) for o in outs]
    assert lens[row] == step + 1 and outs[row]["token_ids"][-1] == IM_END and max(lens) == THINKER_TOKENS
    # The re-marking: the early row's trailing rows are g1, g2 (= its EOS), tts_eos, then tts_pad.
    trail = tps[row].trailing
    assert trail.shape[0] == THINKER_TOKENS - 1
    np.testing.assert_array_equal(trail[step], sg.tts_eos)
    np.testing.assert_array_equal(trail[step + 1:], np.broadcast_to(sg.tts_pad, trail[step + 1:].shape))
    code_lens = cap["code_lengths"]
    assert len(set(code_lens)) > 1 and min(code_lens) < TALKER_TOKENS - 1  # rows stop at different steps
    assert any(o["codec_finished"] for o in outs) and not all(o["codec_finished"] for o in outs)
    check_batch(session, hf, cap, outs, tps)


def test_bad_batch_requests(session, prompts):
    sg = session.speech
    h = np.zeros((prompts[0].__len__() + 1, session.cfg.talker_config.thinker_hidden_size), np.float32)
    with pytest.raises(SpeechError, match="one prompt, generated ids and hidden states per row"):
        sg.talker_prompts(prompts[:2], [[1, 2]], [h], [h])
    with pytest.raises(SpeechError, match=r"row 0: its 21 prompt tokens and 1 fed-back"):
        sg.talker_prompts(prompts[:1], [[1, 2]], [h[:-1]], [h[:-1]])
    short = [TINY_TOKENS["im_start"], TINY_TOKENS["assistant"]]  # row 1 shorter than row 0's assistant offset
    h2 = np.zeros((h.shape[0] + 1, h.shape[1]), np.float32)
    with pytest.raises(SpeechError, match="row 1: its prompt .* shorter than the assistant part"):
        sg.talker_prompts([prompts[0] + [7], short], [[1, 2], [1, 2]], [h2, h[:3]], [h2, h[:3]])
    with pytest.raises(SpeechError, match="at least 2 generated thinker tokens"):
        sg.talker_prompts(prompts[:1], [[1]], [h[:-1]], [h[:-1]])
    with pytest.raises(SpeechError, match="unknown speaker"):
        sg.talker_prompts(prompts[:1], [[1, 2]], [h], [h], speaker="Nobody")
    with pytest.raises(SpeechError, match="max_new_tokens must be >= 2"):
        sg.generate_codes_batch([None], max_new_tokens=1)
    with pytest.raises(SpeechError, match="at least one conversation"):
        session.speak_batch([])

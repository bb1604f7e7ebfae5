"""Talker training (omni_jax/train/talker.py): the teacher-forced talker input equals speech.py's talker prompt
followed by the decode inputs, the codebook-0 / code-predictor / load-balancing losses equal transformers'
forward(labels=...) on the same inputs, bad records, and the toy talker config learning on CPU."""

import json
import os
import types

import numpy as np
import pytest
import soundfile as sf
import torch
from flax import nnx
from hf_fixtures import hf_model_from_dir

from omni_jax.config import ConfigError, tiny
from omni_jax.inference import OmniSession
from omni_jax.processing import chat
from omni_jax.prompt import prepare_thinker_prompt
from omni_jax.train import data as D
from omni_jax.train import loop as L
from omni_jax.train import step as TS
from omni_jax.train import talker as TT
from omni_jax.train import toy

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RTOL = 1e-5


def test_codec_frames_are_deterministic_and_learnable():
    ids = [5, 300, 5, 17]
    a = toy.codec_frames(ids, num_code_groups=4, frames_per_token=2)
    assert a.shape == (8, 4) and a.dtype == np.int32
    np.testing.assert_array_equal(a, toy.codec_frames(ids, num_code_groups=4, frames_per_token=2))
    np.testing.assert_array_equal(a[0:2], a[4:6])  # same token, same frames
    assert 0 <= a.min() and a.max() < 2048
    every = toy.codec_frames(np.arange(512), num_code_groups=4, frames_per_token=2)
    assert len(np.unique(every[:, 0])) == 1024  # codebook 0 identifies (token, frame): residuals follow from it
    assert not np.array_equal(a, toy.codec_frames(ids, num_code_groups=4, frames_per_token=2, seed=1))


def _records(tmp_path, rng):
    """A multi-turn text chat (system turn, an earlier assistant turn) and an audio question, with codec frames."""
    text = {"messages": [{"role": "system", "content": "You are kind."},
                         {"role": "user", "content": "Tell me a story about a cat."},
                         {"role": "assistant", "content": "Once upon a time."},
                         {"role": "user", "content": "More, please"},
                         {"role": "assistant", "content": "The cat sat."}]}
    sf.write(tmp_path / "a.wav", toy.tone_clip(np.random.default_rng(3), 3, "high"), 16000, subtype="PCM_16")
    audio = {"messages": [{"role": "user", "content": [{"type": "audio", "path": "a.wav"},
                                                       {"type": "text", "text": toy.AUDIO_QUESTION}]},
                          {"role": "assistant", "content": "3 high"}]}
    text["codec_codes"] = rng.integers(0, 2048, (5, 4)).tolist()
    audio["codec_codes"] = rng.integers(0, 2048, (7, 4)).tolist()
    return [text, audio]


def test_talker_losses_match_transformers(tiny_hf_dir, tmp_path):
    """Two examples (text chat; audio user turn -> hidden_projection rows), right-padded to one batch:
    our in-graph talker input rows = speech.py's prompt (from HF thinker hidden states) + HF-embedded frame rows;
    talker CE, load-balancing loss, and code-predictor CE (one HF call per residual codebook, shift_labels on the
    last row) equal transformers' forward(labels=...) in fp32."""
    session = OmniSession(tiny_hf_dir, speech=True)
    hf = hf_model_from_dir(tiny_hf_dir)
    # transformers 5.23's talker forward(labels=...) reads config.vocab_size, which only its text_config has.
    hf.talker.config.vocab_size = hf.talker.config.text_config.vocab_size
    cfg, tcfg = session.cfg, session.cfg.talker_config
    q, k = tcfg.num_code_groups, tcfg.accept_hidden_layer
    recs = _records(tmp_path, np.random.default_rng(0))
    c = D.DataConfig(seq_len=80, batch_size=2, audio_slots=1, audio_frames=104)
    tc = TT.TalkerTrainConfig(seq_len=64, max_frames=8, aux_loss_coef=0.001)
    pre = TT.TalkerPreprocessor(session.tokenizer, cfg, c, str(tmp_path), tc)
    examples = [pre((i, json.dumps(r))) for i, r in enumerate(recs)]
    assert all("bad" not in e for e in examples), examples
    batch = L._to_device(TT.stack(examples))
    total, m = nnx.jit(lambda mod, b: TT.talker_loss(mod, b, tc))(session.model, batch)
    ours = np.asarray(nnx.jit(TT.talker_inputs)(session.model, batch))

    emb0 = hf.talker.get_input_embeddings()
    emb_r = hf.talker.code_predictor.get_input_embeddings()
    ref_rows, frames_at, n_prompt_rows = [], [], []
    for i, (rec, ex) in enumerate(zip(recs, examples)):
        p, n = int(np.argmax(ex["loss_mask"])), int(ex["loss_mask"].sum())  # reply tokens + <|im_end|>
        ids = ex["input_ids"][:p + n - 1]  # what the talker may see: the prompt and the fed-back reply tokens
        kw = {}
        prompt = prepare_thinker_prompt(session.tokenizer, cfg, chat.parse_messages(rec["messages"][:-1], tmp_path))
        if prompt.audio is not None:
            feats, fr = prompt.audio
            kw = {"input_features": torch.tensor(feats),
                  "feature_attention_mask": torch.tensor(np.arange(feats.shape[-1])[None] < fr[:, None],
                                                         dtype=torch.long)}
        with torch.no_grad():
            hs = hf.thinker(input_ids=torch.tensor(ids[None], dtype=torch.long), output_hidden_states=True,
                            **kw).hidden_states
        tp = session.speech.talker_prompt(
            ids[:p], ex["input_ids"][p:p + n], hs[0][0].numpy(), hs[k][0].numpy(), speaker="ethan",
            audio_seqlens=None if prompt.audio is None else [int(f) for f in prompt.audio[1]])
        codes = torch.tensor(rec["codec_codes"])
        f = codes.shape[0]
        with torch.no_grad():
            frame = emb0(codes[:, 0]) + sum(emb_r[j - 1](codes[:, j]) for j in range(1, q))
            eos = emb0(torch.tensor([tcfg.codec_eos_token_id]))
        text = [tp.trailing[j] if j < len(tp.trailing) else tp.tts_pad for j in range(f + 1)]
        rows = np.concatenate([tp.embeds, torch.cat([frame, eos]).numpy() + np.stack(text)])
        lp = tp.embeds.shape[0]
        assert int(ex["frame_start"]) == lp and int(ex["talker_valid"].sum()) == lp + f + 1
        if i == 1:
            assert tp.num_user_rows > 10 and ex["talker_text_mm"].sum() > 10  # audio rows: hidden_projection
        scale = np.abs(rows).max()
        np.testing.assert_allclose(ours[i, :lp + f + 1], rows, rtol=RTOL, atol=RTOL * scale)
        np.testing.assert_array_equal(ex["talker_positions"][:, :lp], tp.positions)
        np.testing.assert_array_equal(ex["talker_positions"][:, lp:lp + f + 1],
                                      tp.positions[:, -1:] + 1 + np.arange(f + 1))
        want = np.full(tc.seq_len, -100)
        want[lp:lp + f] = codes[:, 0].numpy()
        want[lp + f] = tcfg.codec_eos_token_id
        np.testing.assert_array_equal(ex["talker_labels"], want)
        ref_rows.append(np.pad(rows, ((0, tc.seq_len - rows.shape[0]), (0, 0))))
        frames_at.append((i, lp, codes))
        n_prompt_rows.append(lp)

    embeds = torch.tensor(np.stack(ref_rows))
    valid = torch.tensor(np.stack([e["talker_valid"] for e in examples]), dtype=torch.long)
    pos = torch.tensor(np.stack([e["talker_positions"] for e in examples]).transpose(1, 0, 2), dtype=torch.long)
    labels = torch.tensor(np.stack([e["talker_labels"] for e in examples]), dtype=torch.long)
    with torch.no_grad():
        ce = hf.talker(inputs_embeds=embeds, attention_mask=valid, position_ids=pos, labels=labels)
        with_aux = hf.talker(inputs_embeds=embeds, attention_mask=valid, position_ids=pos, labels=labels,
                             output_router_logits=True)
        hidden = hf.talker.model(inputs_embeds=embeds, attention_mask=valid, position_ids=pos).last_hidden_state
    np.testing.assert_allclose(float(m["talker_ce"]), float(ce.loss), rtol=RTOL)
    np.testing.assert_allclose(float(m["aux_loss"]), float(with_aux.aux_loss), rtol=RTOL)
    np.testing.assert_allclose(float(m["talker_ce"] + 0.001 * m["aux_loss"]), float(with_aux.loss), rtol=RTOL)
    shifted = labels[:, 1:]
    hit = (ce.logits[:, :-1].argmax(-1) == shifted) & (shifted >= 0)
    assert int(m["c0_correct"]) == int(hit.sum()) and int(m["target_tokens"]) == int((shifted >= 0).sum())

    # Code predictor: codebook j from the first j+1 rows [h, E_talker(c0), E_cp[0](c1), ...], head j-1.
    h = torch.cat([hidden[i, lp - 1:lp - 1 + codes.shape[0]] for i, lp, codes in frames_at])
    codes = torch.cat([cd for _, _, cd in frames_at])
    per_codebook = []
    with torch.no_grad():
        rows = [h, emb0(codes[:, 0])] + [emb_r[j - 1](codes[:, j]) for j in range(1, q - 1)]
        for j in range(1, q):
            x = torch.stack(rows[:j + 1], dim=1)
            tgt = torch.full((x.shape[0], j + 1), -100, dtype=torch.long)
            tgt[:, -1] = codes[:, j]
            per_codebook.append(float(hf.talker.code_predictor(inputs_embeds=x, labels=tgt, shift_labels=tgt).loss))
    np.testing.assert_allclose(float(m["mtp_ce"]), np.mean(per_codebook), rtol=RTOL)
    np.testing.assert_allclose(float(total), float(m["talker_ce"] + m["mtp_ce"] + 0.001 * m["aux_loss"]),
                               rtol=1e-6)
    assert int(m["frames"]) == 12 and int(m["code_targets"]) == 12 * (q - 1) and int(m["examples"]) == 2


def test_talker_layout_rejects_bad_codec_targets(tmp_path):
    from omni_jax.processing.tiny_tokenizer import write_tiny_tokenizer
    from omni_jax.processing.tokenizer import Tokenizer

    write_tiny_tokenizer(str(tmp_path / "tok"))
    tok = Tokenizer.from_dir(str(tmp_path / "tok"))
    cfg = tiny()
    c = D.DataConfig(seq_len=48, batch_size=1)
    pre = TT.TalkerPreprocessor(tok, cfg, c, str(tmp_path), TT.TalkerTrainConfig(seq_len=40, max_frames=6))
    msgs = [{"role": "user", "content": "Read aloud: red"}, {"role": "assistant", "content": "red"}]

    def bad(**extra):
        out = pre((0, json.dumps({"messages": msgs, **extra})))
        assert "bad" in out, out.keys()
        return out["bad"]

    assert "codec_codes" in bad()
    assert "4 codes each" in bad(codec_codes=[[1, 2, 3]])
    assert "out of range" in bad(codec_codes=[[1, 2, 3, 4096]])
    assert "exceed talker.max_frames=6" in bad(codec_codes=[[1, 2, 3, 4]] * 7)
    assert "unknown speaker" in bad(codec_codes=[[1, 2, 3, 4]], speaker="nobody")
    long = TT.TalkerPreprocessor(tok, cfg, c, str(tmp_path), TT.TalkerTrainConfig(seq_len=30, max_frames=6))
    assert "exceed talker.seq_len=30" in long((0, json.dumps({"messages": msgs, "codec_codes": [[1, 2, 3, 4]] * 6})))[
        "bad"]
    ok = pre((0, json.dumps({"messages": msgs, "codec_codes": [[1, 2, 3, 4]] * 2})))
    assert "bad" not in ok and ok["codec_valid"].sum() == 2


def _talker_cfg(*extra):
    return L.apply_overrides(L.load_config_file(os.path.join(REPO, "configs/toy.py:talker")), list(extra))


def test_talker_task_config_errors():
    with pytest.raises(ConfigError, match="unknown train.task 'speech'"):
        L.talker_task(_talker_cfg("--config.train.task=speech"))
    cfg = _talker_cfg()
    with cfg.unlocked():
        cfg.talker.extra = 1
    with pytest.raises(TT.TalkerTrainError, match="unknown keys in config.talker"):
        L.talker_task(cfg)
    task = L.talker_task(_talker_cfg())
    with pytest.raises(TT.TalkerTrainError, match="include 'talker'"):
        task.check_model(types.SimpleNamespace(talker=None))  # e.g. model.parts without "talker"
    with pytest.raises(TT.TalkerTrainError, match="talker.seq_len must be"):
        TT.TalkerTask(TT.TalkerTrainConfig(seq_len=5))


def test_toy_talker_training_reduces_both_losses(tmp_path):
    """configs/toy.py:talker for 30 steps (thinker frozen): talker CE and code-predictor CE fall below 50% of
    their first-step values, the frozen thinker is bit-identical, and the eval rows report codec accuracy."""
    cfg = _talker_cfg("--config.train.steps=30", "--config.optim.total_steps=30", "--config.optim.warmup_steps=5",
                      "--config.optim.learning_rate=0.01", "--config.optim.end_lr_fraction=0.5",
                      "--config.toy.n_train=240", "--config.toy.n_eval=8", "--config.data.batch_size=8",
                      "--config.train.log_every=1", "--config.train.eval_every=0", "--config.train.ckpt_every=0",
                      "--config.train.export=false")
    tr = L.Trainer(cfg, str(tmp_path), progress=False)
    thinker_before = np.asarray(tr.model.thinker.lm_head.kernel[...])
    talker_before = np.asarray(tr.model.talker.codec_head.kernel[...])
    out = tr.run()
    rows = [json.loads(x) for x in open(tmp_path / "metrics.jsonl")]
    steps = [r for r in rows if "talker_ce" in r]
    first, last = steps[0], steps[-1]
    assert [r["step"] for r in steps] == list(range(1, 31))
    assert last["talker_ce"] < 0.5 * first["talker_ce"], (first, last)
    assert last["mtp_ce"] < 0.5 * first["mtp_ce"], (first, last)
    assert last["code_accuracy"] > 0.5 and first["code_accuracy"] < 0.1
    merged = tr.merged_model()
    np.testing.assert_array_equal(np.asarray(merged.thinker.lm_head.kernel[...]), thinker_before)
    assert not np.array_equal(np.asarray(merged.talker.codec_head.kernel[...]), talker_before)
    assert TS.is_frozen(("thinker", "model", "embed_tokens", "embedding"), tr.patterns)
    assert 0.0 <= out["eval_code_accuracy"] <= 1.0 and out["eval_examples"] == 8
    assert out["eval_mtp_loss"] < 0.5 * first["mtp_ce"]

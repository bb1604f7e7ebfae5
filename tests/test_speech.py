"""Speech output end to end against transformers 5.23 `Qwen3OmniMoeForConditionalGeneration.generate(...,
return_audio=True)` on the tiny random checkpoint (fp32, greedy thinker / talker / code predictor).

Captured from HF: the talker's `generate` kwargs (prompt rows, trailing text rows, tts_pad row, talker ids), the
prefill call's position ids and logits (forward hook), the codec frames given to `code2wav.chunked_decode`, and
the returned waveform. Bad codes for Code2Wav are covered by tests/test_code2wav.py::test_bad_codes_raise.
"""

from __future__ import annotations

import json
import re

import jax
import numpy as np
import pytest
import soundfile as sf
import torch
from hf_fixtures import hf_model_from_dir

from omni_jax import cli
from omni_jax.config import TINY_TOKENS
from omni_jax.inference import OmniSession
from omni_jax.processing import chat
from omni_jax.speech import SAMPLE_RATE, SpeechError, talker_sampling

THINKER_TOKENS = 6
TALKER_TOKENS = 12  # no codec EOS on the random model: 11 frames
TEXT = [{"role": "system", "content": "You are kind."}, {"role": "user", "content": "Tell me a story about a cat."},
        {"role": "assistant", "content": "Once upon a time."}, {"role": "user", "content": "More, please"}]
WAV_ATOL = 1e-3  # SnakeBeta amplifies fp32 rounding; measured max 1.8e-4


def _tone(seconds, freq, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.RandomState(int(freq))
    return (0.4 * np.sin(2 * np.pi * freq * t) + 0.05 * rng.randn(t.size)).astype(np.float32)


def _image(h, w, seed):
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 3 + seed * 40) % 256, (yy * 5) % 256, ((xx + yy) * 2) % 256], -1)
    return (img + rng.randint(0, 20, img.shape)).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def session(tiny_hf_dir):
    return OmniSession(tiny_hf_dir, speech=True)


@pytest.fixture(scope="module")
def hf(tiny_hf_dir):
    model = hf_model_from_dir(tiny_hf_dir)
    # P13a: the talker's get_rope_index reads config.audio_config (absent) for audio + image prompts.
    model.talker.config.audio_config = model.config.thinker_config.audio_config
    return model


def hf_speech(hf, ids, talker_max_new_tokens=TALKER_TOKENS, **kwargs):
    """HF generate with audio output, greedy; returns the captured talker inputs, prefill outputs, codes, wav."""
    cap = {}
    gen, decode = hf.talker.generate, hf.code2wav.chunked_decode

    def talker_generate(**kw):
        cap["kw"] = kw
        out = gen(**kw)
        cap["sequences"] = out.sequences[0].tolist()
        return out

    def chunked_decode(codes, **kw):
        cap["codes"] = codes[0].numpy().copy()
        return decode(codes, **kw)

    def hook(mod, args, kw, output):
        if "logits" not in cap:  # the prefill call
            cap["logits"], cap["positions"] = output.logits[0, -1].numpy().copy(), kw["position_ids"].numpy()

    handle = hf.talker.register_forward_hook(hook, with_kwargs=True)
    hf.talker.generate, hf.code2wav.chunked_decode = talker_generate, chunked_decode
    try:
        with torch.no_grad():
            seq, wav = hf.generate(input_ids=torch.tensor([ids]), return_audio=True,
                                   thinker_max_new_tokens=THINKER_TOKENS, thinker_eos_token_id=TINY_TOKENS["im_end"],
                                   thinker_do_sample=False, talker_do_sample=False,
                                   talker_max_new_tokens=talker_max_new_tokens, speaker="ethan", **kwargs)
    finally:
        handle.remove()
        del hf.talker.generate, hf.code2wav.chunked_decode  # back to the class methods
    cap["generated"] = seq[0, len(ids):].tolist()
    cap["wav"] = wav[0, 0].numpy()
    return cap


def _check_prompt(session, hf, tp, cap):
    """Talker prompt rows (user rows, both assistant tracks, trailing, tts_pad), ids, positions, prefill logits."""
    kw = cap["kw"]
    ref = kw["inputs_embeds"][0].numpy()
    scale = np.abs(ref).max()
    assert tp.embeds.shape == ref.shape
    np.testing.assert_allclose(tp.embeds, ref, rtol=1e-5, atol=1e-5 * scale)
    cfg = session.cfg.talker_config
    codec_ids = [cfg.codec_nothink_id, cfg.codec_think_bos_id, cfg.codec_think_eos_id, 2302, cfg.codec_pad_id,
                 cfg.codec_bos_id]
    with torch.no_grad():
        ref_codec = hf.talker.get_input_embeddings()(torch.tensor(codec_ids)).numpy()
    np.testing.assert_array_equal(tp.assistant_codec[:3], 0)
    np.testing.assert_allclose(tp.assistant_codec[3:], ref_codec, rtol=1e-6, atol=0)
    ref_text = ref[-9:] - np.concatenate([np.zeros((3, ref.shape[1]), np.float32), ref_codec])
    np.testing.assert_allclose(tp.assistant_text, ref_text, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(tp.trailing, kw["trailing_text_hidden"][0].numpy(), rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(tp.tts_pad, kw["tts_pad_embed"][0, 0].numpy(), rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_array_equal(tp.ids, kw["talker_input_ids"][0].numpy())
    np.testing.assert_array_equal(tp.positions, cap["positions"][1:, 0])  # rows 1..3 = T, H, W
    logits = session.speech.prefill_logits(tp)
    np.testing.assert_allclose(logits, cap["logits"], rtol=1e-5, atol=1e-5 * np.abs(cap["logits"]).max())
    return np.abs(tp.embeds - ref).max() / scale, np.abs(logits - cap["logits"]).max() / np.abs(cap["logits"]).max()


def _check_speech(session, tp, cap, n_tokens=TALKER_TOKENS):
    res = session.speech.generate_codes(tp, max_new_tokens=n_tokens, sampling=talker_sampling(greedy=True))
    np.testing.assert_array_equal(res.codes, cap["codes"])
    assert res.codec_tokens == cap["sequences"]
    wav = session.speech.waveform(res.codes)
    assert wav.shape == cap["wav"].shape and wav.dtype == np.float32
    unclipped = np.abs(cap["wav"]) < 0.99
    assert unclipped.sum() > 1000  # the comparison is not only of the clamp
    np.testing.assert_allclose(wav, cap["wav"], rtol=0, atol=WAV_ATOL)
    return res, wav


@pytest.fixture(scope="module")
def text_run(session, hf):
    greedy = session.sampling(greedy=True)
    out, tp = session.talker_prompt(chat.parse_messages(TEXT), max_new_tokens=THINKER_TOKENS, sampling=greedy)
    cap = hf_speech(hf, out["prompt_token_ids"])
    return out, tp, cap


def test_text_prompt_matches_transformers(session, hf, text_run):
    """Multi-turn text chat (system turn and an earlier assistant turn are dropped by the talker)."""
    out, tp, cap = text_run
    assert out["token_ids"] == cap["generated"]
    ids = np.asarray(out["prompt_token_ids"])
    turns = np.split(ids, np.nonzero(ids == TINY_TOKENS["im_start"])[0])[1:]
    assert tp.num_user_rows == sum(len(t) for t in turns if t[1] == TINY_TOKENS["user"])
    _check_prompt(session, hf, tp, cap)
    res, _ = _check_speech(session, tp, cap)
    assert res.codes.shape == (4, TALKER_TOKENS - 1) and not res.finished  # N tokens, no EOS -> N-1 frames


def test_variant_b_text_prompt_matches_transformers(tiny_hf_dir_b):
    """Fixture b: thinker hidden 80 and accept_hidden_layer=1 (other thinker shapes; same talker shapes)."""
    session, hf = OmniSession(tiny_hf_dir_b, speech=True), hf_model_from_dir(tiny_hf_dir_b)
    out, tp = session.talker_prompt(chat.parse_messages(TEXT), max_new_tokens=THINKER_TOKENS,
                                    sampling=session.sampling(greedy=True))
    cap = hf_speech(hf, out["prompt_token_ids"], talker_max_new_tokens=6)
    assert out["token_ids"] == cap["generated"]
    _check_prompt(session, hf, tp, cap)
    _check_speech(session, tp, cap, n_tokens=6)


def _media_messages(tmp_path, with_image: bool):
    sf.write(tmp_path / "a.wav", _tone(1.3, 220), 16000, subtype="FLOAT")
    parts = [{"type": "audio", "path": "a.wav"}]
    if with_image:
        from PIL import Image

        Image.fromarray(_image(64, 96, 1)).save(tmp_path / "b.png")  # multiples of 32: no resize
        parts.append({"type": "image", "path": "b.png"})
    parts.append({"type": "text", "text": "What do you hear?"})
    return chat.parse_messages([{"role": "system", "content": "Listen."}, {"role": "user", "content": parts}],
                               base_dir=tmp_path)


def _hf_media_kwargs(prompt):
    """The thinker inputs of our prompt in HF's form (features are tested equal to HF's in test_audio_features)."""
    feats, frames = prompt.audio
    kw = {"input_features": torch.tensor(feats),
          "feature_attention_mask": torch.tensor(np.arange(feats.shape[-1])[None] < frames[:, None], dtype=torch.long)}
    if prompt.image is not None:
        kw.update(pixel_values=torch.tensor(prompt.image[0]), image_grid_thw=torch.tensor(prompt.image[1]))
    return kw


def test_audio_prompt_matches_transformers(session, hf, tmp_path):
    """Audio rows of the user turn take hidden_projection(thinker layer accept_hidden_layer); positions are plain
    (the reference's audio-only get_rope_index is cumsum)."""
    messages = _media_messages(tmp_path, with_image=False)
    greedy = session.sampling(greedy=True)
    out, tp = session.talker_prompt(messages, max_new_tokens=THINKER_TOKENS, sampling=greedy)
    cap = hf_speech(hf, out["prompt_token_ids"], **_hf_media_kwargs(session.prompt(messages)))
    assert out["token_ids"] == cap["generated"]
    n_audio = int((tp.ids == TINY_TOKENS["audio_pad"]).sum())
    assert n_audio > 10
    _check_prompt(session, hf, tp, cap)
    _check_speech(session, tp, cap)


def test_audio_and_image_prompt_positions_match_transformers(session, hf, tmp_path):
    """Audio + image in the user turn: the talker's TM-RoPE positions (image grid, talker config) as HF computes
    them with the P13a workaround; prompt rows and prefill logits. (Talker decoding is covered above.)"""
    messages = _media_messages(tmp_path, with_image=True)
    greedy = session.sampling(greedy=True)
    out, tp = session.talker_prompt(messages, max_new_tokens=THINKER_TOKENS, sampling=greedy)
    cap = hf_speech(hf, out["prompt_token_ids"], talker_max_new_tokens=2, **_hf_media_kwargs(session.prompt(messages)))
    assert out["token_ids"] == cap["generated"]
    assert not np.array_equal(tp.positions[0], tp.positions[1])  # not plain positions
    _check_prompt(session, hf, tp, cap)


def test_talker_max_new_tokens_and_codec_eos(session, hf, text_run):
    """talker_max_new_tokens=N samples N codebook-0 codes and expands all but the last (N-1 frames); codec EOS
    (forced here by giving EOS the codec_head row of a code that wins at step 3, scaled up) stops the talker and
    yields no frame. Both vs HF, with the same edit to both models."""
    out, tp, cap = text_run
    sg = session.speech
    res = sg.generate_codes(tp, max_new_tokens=4, sampling=talker_sampling(greedy=True))
    assert res.codes.shape == (4, 3) and len(res.codec_tokens) == 4
    np.testing.assert_array_equal(res.codes, cap["codes"][:, :3])
    with pytest.raises(SpeechError, match="max_new_tokens must be >= 2"):
        sg.generate_codes(tp, max_new_tokens=1)

    eos = session.cfg.talker_config.codec_eos_token_id
    target = int(cap["codes"][0, 3])
    old = sg.state
    sg.state = jax.tree_util.tree_map_with_path(
        lambda p, x: x.at[:, eos].set(1.5 * x[:, target]) if "codec_head" in jax.tree_util.keystr(p) else x, old)
    head = hf.talker.codec_head.weight
    saved = head.detach().clone()
    try:
        with torch.no_grad():
            head[eos] = 1.5 * head[target]
        ref = hf_speech(hf, out["prompt_token_ids"])
        got = sg.generate_codes(tp, max_new_tokens=TALKER_TOKENS, sampling=talker_sampling(greedy=True))
    finally:
        sg.state = old
        with torch.no_grad():
            head.copy_(saved)
    assert ref["sequences"][-1] == eos and len(ref["sequences"]) < TALKER_TOKENS  # HF stopped on EOS
    assert got.finished and got.codec_tokens == ref["sequences"]
    np.testing.assert_array_equal(got.codes, ref["codes"])
    assert got.codes.shape[1] == len(ref["sequences"]) - 1


def test_streaming(session, hf, text_run):
    """Chunks arrive while frames are produced; their concatenation is the documented windowed decode, which
    equals the offline decode (HF's waveform) when every window reaches frame 0."""
    out, tp, cap = text_run
    sg = session.speech
    up, loss = sg.total_upsample, sg.tail_loss
    codes = cap["codes"]
    t = codes.shape[1]

    def run(group, ctx):
        at_yield, chunks = [], []
        for c in sg.stream(tp, max_new_tokens=TALKER_TOKENS, sampling=talker_sampling(greedy=True),
                           group_frames=group, left_context=ctx):
            at_yield.append(c.num_codec_frames)  # frames produced when the chunk was made
            chunks.append(c.samples)
        return chunks, at_yield

    # Full left context: identical (up to fp32 noise) to the offline decode HF returns.
    chunks, at_yield = run(3, t)
    assert at_yield == [3, 6, 9, 11]  # the first chunk comes after 3 of 11 frames
    assert [len(c) for c in chunks] == [3 * up - loss, 3 * up, 3 * up, 2 * up]
    np.testing.assert_allclose(np.concatenate(chunks), cap["wav"], rtol=0, atol=WAV_ATOL)

    # Short left context: each chunk is HF code2wav's output of window [s - min(ctx, s), e) for absolute samples
    # [max(0, 1920 s - 555), 1920 e - 555), as documented in SpeechGenerator.stream.
    group, ctx = 3, 2
    chunks, _ = run(group, ctx)
    ref = []
    for s in range(0, t, group):
        e = min(s + group, t)
        c = min(ctx, s)
        with torch.no_grad():
            w = hf.code2wav(torch.tensor(codes[None, :, s - c:e]).long())[0, 0].numpy()
        ref.append(w[max(0, s * up - loss) - (s - c) * up:])
    assert [len(c) for c in chunks] == [len(r) for r in ref]
    np.testing.assert_allclose(np.concatenate(chunks), np.concatenate(ref), rtol=0, atol=WAV_ATOL)
    assert np.abs(np.concatenate(chunks) - cap["wav"]).max() > 10 * WAV_ATOL  # the context cut is visible


def test_session_stream_speech(session):
    state = {}
    chunks = list(session.stream_speech(chat.parse_messages(TEXT), max_new_tokens=THINKER_TOKENS,
                                        sampling=session.sampling(greedy=True), talker_max_new_tokens=6,
                                        talker=talker_sampling(greedy=True), state=state))
    up = session.speech.total_upsample
    assert session.speech.group_frames == 4
    assert [len(c) for c in chunks] == [4 * up - session.speech.tail_loss, up]  # 5 frames in groups of 4
    assert len(state["codec_tokens"]) == 6 and state["text"]["token_ids"]


def test_sampled_speech_is_seeded(session, text_run):
    _, tp, _ = text_run
    a, b, c = (session.speech.generate_codes(tp, max_new_tokens=6, sampling=talker_sampling(seed=s)).codes
               for s in (1, 1, 2))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.max() < 2048  # suppressed ids never sampled


def test_bad_speech_requests(session, tiny_hf_dir_factory):
    messages = chat.parse_messages(TEXT)
    with pytest.raises(SpeechError, match=r"unknown speaker 'Nobody'.*chelsie, ethan"):
        session.speak(messages, speaker="Nobody")
    with pytest.raises(SpeechError, match="at least 2 generated thinker tokens"):
        session.speak(messages, max_new_tokens=1, sampling=session.sampling(greedy=True))
    with pytest.raises(SpeechError, match="no speech output"):
        OmniSession(tiny_hf_dir_factory("a", "v5", False), speech=True)
    with pytest.raises(SpeechError, match="batch size 1"):
        session.speech.talker_prompt([[1, 2]] * 2, [3, 4], np.zeros((2, 5, 64)), np.zeros((2, 5, 64)))
    with pytest.raises(SpeechError, match="group_frames and left_context"):
        next(session.speech.stream(None, left_context=0))


def test_cli_speak(tiny_hf_dir, tiny_hf_dir_factory, text_run, tmp_path, capsys):
    """`omni-jax generate --speak` (greedy) writes HF's waveform; thinker-only checkpoints and unknown speakers give
    one-line errors."""
    _, _, cap = text_run
    msgs = tmp_path / "m.json"
    msgs.write_text(json.dumps(TEXT))
    wav_path = str(tmp_path / "out.wav")
    code = cli.main(["generate", "--model", tiny_hf_dir, "--messages", str(msgs), "--greedy", "--max-new-tokens",
                     str(THINKER_TOKENS), "--speak", wav_path, "--talker-max-new-tokens", str(TALKER_TOKENS),
                     "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(out)
    assert res["audio_path"] == wav_path and res["num_codec_frames"] == TALKER_TOKENS - 1
    assert res["token_ids"] == cap["generated"]
    wav, sr = sf.read(wav_path, dtype="float32")
    assert sr == SAMPLE_RATE and sf.info(wav_path).subtype == "FLOAT"
    np.testing.assert_allclose(wav, cap["wav"], rtol=0, atol=WAV_ATOL)

    # --stream: the text as it comes, the wav written chunk by chunk (each chunk's arrival time on stderr); the
    # finished file equals the non-streaming one (every window of these frames reaches back to frame 0; Code2Wav
    # runs at other padded lengths, so fp32 rounding differs: measured max 1.6e-5).
    stream_path = str(tmp_path / "stream.wav")
    code = cli.main(["generate", "--model", tiny_hf_dir, "--messages", str(msgs), "--greedy", "--max-new-tokens",
                     str(THINKER_TOKENS), "--speak", stream_path, "--talker-max-new-tokens", str(TALKER_TOKENS),
                     "--stream"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out == res["text"] + "\n"
    times = [float(t) for t in re.findall(r"audio chunk \d+: \d+ samples .* at ([0-9.]+) s", err)]
    assert len(times) == -(-(TALKER_TOKENS - 1) // 4) and times == sorted(times)
    streamed, sr = sf.read(stream_path, dtype="float32")
    assert sr == SAMPLE_RATE and streamed.shape == wav.shape
    np.testing.assert_allclose(streamed, wav, rtol=0, atol=1e-4)

    for model, extra, needle in ((tiny_hf_dir_factory("a", "v5", False), (), "no speech output"),
                                 (tiny_hf_dir, ("--speaker", "Zed"), "unknown speaker 'Zed'")):
        code = cli.main(["generate", "--model", model, "--messages", str(msgs), "--speak", wav_path, *extra])
        out, err = capsys.readouterr()
        assert code == 2 and out == "" and needle in err and "Traceback" not in err

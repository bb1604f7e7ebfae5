"""The Pallas TPU kernels end to end on CPU (interpret mode) against the default XLA paths (issue 14):

- serving: on a tiny checkpoint written by transformers, text, audio, image and video prompts give the same greedy
  tokens, and prefill logits within fp32 rounding, with `attention_impl="splash", moe_impl="megablox"` as with the
  defaults (two OmniSessions, opened as `omni-jax generate` opens them);
- training: five optimizer steps of the toy task (text and picture questions) give the same per-step losses with
  `loss.attention_impl=splash, loss.moe_impl=megablox` as with the XLA defaults.

Spies record every call of the Pallas paths while the steps are traced, so a path that silently fell back to XLA
(or never received the mask kind it should) fails these tests.
"""

import collections
import json
import os
import traceback

import numpy as np
import pytest

from omni_jax.kernels.attention import splash
from omni_jax.kernels.moe import api as moe_api

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PALLAS = dict(moe_impl="megablox", attention_impl="splash")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counter of Pallas kernel calls made while tracing: ("splash", model file, q shape, causal, kv_lengths given)
    and ("megablox", token rows)."""
    calls = collections.Counter()
    real_splash, real_megablox = splash.splash_attention, moe_api.IMPLS["megablox"]

    def spy_splash(q, k, v, mask, *args, **kw):
        files = [os.path.basename(f.filename) for f in traceback.extract_stack()
                 if f"omni_jax{os.sep}models{os.sep}" in f.filename]
        calls["splash", files[-1] if files else None, tuple(q.shape), mask.causal, mask.kv_lengths is not None] += 1
        return real_splash(q, k, v, mask, *args, **kw)

    def spy_megablox(x, *args, **kw):
        calls["megablox", x.shape[0]] += 1
        return real_megablox(x, *args, **kw)

    monkeypatch.setattr(splash, "splash_attention", spy_splash)  # api.attention imports it at call time
    monkeypatch.setitem(moe_api.IMPLS, "megablox", spy_megablox)
    return calls


def _media(d):
    """An 8.5 s tone (2 audio-encoder attention windows: 104 + 7 tokens), two pictures of different sizes (16 and 24
    patches: two per-image attention groups) and a 4-frame video at the processor's minimum frame size (2 temporal
    patches of 512 patches: one attention row per frame pair)."""
    import soundfile as sf
    from PIL import Image

    rng = np.random.default_rng(0)
    t = np.arange(int(8.5 * 16000)) / 16000
    sf.write(os.path.join(d, "a.wav"), (0.4 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), 16000,
             subtype="FLOAT")
    for name, (h, w) in (("i1.png", (64, 64)), ("i2.png", (64, 96))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(os.path.join(d, name))
    np.save(os.path.join(d, "v.npy"), rng.integers(0, 256, (4, 256, 512, 3), dtype=np.uint8))
    return {
        "text": [{"role": "user", "content": "count the tones: one two three"}],
        "audio": [{"role": "user", "content": [{"type": "audio", "path": "a.wav"},
                                               {"type": "text", "text": "What do you hear?"}]}],
        "image": [{"role": "user", "content": [{"type": "image", "path": "i1.png"}, {"type": "image", "path": "i2.png"},
                                               {"type": "text", "text": "Compare them."}]}],
        "video": [{"role": "user", "content": [{"type": "video", "path": "v.npy", "fps": 2.0},
                                               {"type": "text", "text": "What happens?"}]}],
    }


def test_serving_pallas_kernels_same_tokens_and_logits_on_transformers_checkpoint(tiny_hf_dir, tmp_path,
                                                                                  kernel_calls):
    """OmniSession (what `omni-jax generate` runs) with the defaults and with splash + megablox."""
    from omni_jax.inference import OmniSession
    from omni_jax.processing import chat

    prompts = _media(str(tmp_path))
    results = {}
    for impls in ({}, PALLAS):
        # prefill_chunk 32: three prefill shapes (ids, embeds, embeds + DeepStack) serve every prompt.
        session = OmniSession(tiny_hf_dir, max_slots=1, max_context=320, chunk_steps=4, prefill_chunk=32, **impls)
        last_logits = []
        prefill = session.engine.thinker.prefill

        def spy_prefill(*args, _prefill=prefill, _out=last_logits, **kw):
            out = _prefill(*args, **kw)
            _out.append(np.asarray(out[0]))
            return out

        session.engine.thinker.prefill = spy_prefill
        for kind, messages in prompts.items():
            out = session.generate(chat.parse_messages(messages, tmp_path), max_new_tokens=5,
                                   sampling=session.sampling(greedy=True))
            results[bool(impls), kind] = out["prompt_token_ids"], out["token_ids"], last_logits[-1]
        if not impls:
            assert not kernel_calls, f"the defaults ran Pallas kernels: {kernel_calls}"
        cfg = session.cfg

    for kind in prompts:
        (ids, tokens, logits), (p_ids, p_tokens, p_logits) = results[False, kind], results[True, kind]
        assert p_ids == ids
        assert p_tokens == tokens and len(tokens) == 5, kind
        # The last prefill chunk's logits (the whole prompt's last position): fp32 rounding apart (measured ~1e-6).
        np.testing.assert_allclose(p_logits, logits, rtol=0, atol=1e-5 * np.abs(logits).max(), err_msg=kind)
    assert len(results[False, "video"][0]) > 256  # the video filled 256 placeholders

    # What ran: splash in every vision block for both picture groups and the video's frame pairs, and in every
    # audio layer over its 2 windows with their live lengths; megablox in prefill (32 rows) and decode (1 row)
    # of every layer; the thinker's first prefill chunk of a prompt (static causal mask over its own keys) in every
    # decoder layer (later chunks attend over the KV cache at a traced offset: the `live` XLA path, covered by
    # test_attention_kernels).
    vc, ac = cfg.thinker_config.vision_config, cfg.thinker_config.audio_config
    tc = cfg.thinker_config.text_config
    vh, ah = (vc.num_heads, vc.hidden_size // vc.num_heads), (ac.encoder_attention_heads,
                                                              ac.d_model // ac.encoder_attention_heads)
    want = {("splash", "vision_encoder.py", (1, 16, *vh), False, False): vc.depth,
            ("splash", "vision_encoder.py", (1, 24, *vh), False, False): vc.depth,
            ("splash", "vision_encoder.py", (2, 512, *vh), False, False): vc.depth,
            ("splash", "audio_encoder.py", (2, 104, *ah), False, True): ac.encoder_layers}
    assert {k: v for k, v in kernel_calls.items() if k[0] == "splash" and k[1] != "thinker.py"} == want
    assert kernel_calls["megablox", 32] >= tc.num_hidden_layers and kernel_calls["megablox", 1] >= tc.num_hidden_layers
    first_chunk = ("splash", "thinker.py", (1, 32, tc.num_attention_heads, tc.head_dim), True, False)
    assert kernel_calls[first_chunk] >= tc.num_hidden_layers, kernel_calls


def test_five_training_steps_pallas_equal_xla(tmp_path, kernel_calls):
    """The toy task, image and text questions (rows right-padded: causal attention with per-row key lengths; one
    64x64 picture slot per row: 16 patches per attention row in the vision encoder, trained too), batch 2, five
    optimizer steps: per-step losses within 1e-5 and gradient norms within 1e-5 relative."""
    from omni_jax.train import loop as L

    def run(name, *overrides):
        # toy.write_split alternates the tasks, so at least 4 of the 10 examples drawn from 12 are pictures.
        cfg = L.apply_overrides(L.load_config_file(os.path.join(REPO, "configs/toy.py:quick")), [
            "--config.toy.tasks=image,text", "--config.toy.n_train=12", "--config.toy.n_eval=0",
            "--config.data.audio_slots=0", "--config.data.seq_len=32", "--config.data.batch_size=2",
            "--config.train.steps=5", "--config.optim.total_steps=5", "--config.train.ckpt_every=0",
            "--config.train.export=false", r"--config.train.freeze=^thinker\.audio_tower\.", *overrides])
        trainer = L.Trainer(cfg, str(tmp_path / name), progress=False)
        out = trainer.run()
        assert (out["status"], out["bad_records"]) == ("done", 0)
        with open(tmp_path / name / "metrics.jsonl") as f:
            rows = [json.loads(line) for line in f]
        return trainer.mcfg.thinker_config, np.array([(r["loss"], r["grad_norm"]) for r in rows])

    _, xla = run("xla")
    assert not kernel_calls
    th, pallas = run("pallas", "--config.loss.attention_impl=splash", "--config.loss.moe_impl=megablox")
    assert xla.shape == (5, 2)
    np.testing.assert_allclose(pallas[:, 0], xla[:, 0], rtol=0, atol=1e-5)  # measured: <= 5e-7
    np.testing.assert_allclose(pallas[:, 1], xla[:, 1], rtol=1e-5)
    # One trace of the train step: splash (forward; its VJP runs splash's backward kernels) in every vision block
    # and decoder layer, and megablox in every decoder layer over all 2 x 32 token rows.
    tc, vc = th.text_config, th.vision_config
    assert kernel_calls == {
        ("splash", "thinker.py", (2, 32, tc.num_attention_heads, tc.head_dim), True, True): tc.num_hidden_layers,
        ("splash", "vision_encoder.py", (2, 16, vc.num_heads, vc.hidden_size // vc.num_heads), False, False): vc.depth,
        ("megablox", 64): tc.num_hidden_layers}

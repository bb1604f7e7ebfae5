"""The serving engine (omni_jax/serving): concurrent requests against transformers and their solo runs, chunked
prefill and decode with rows stopping mid-chunk, speech through the engine, cancellation, validation, no
compilation after warm-up, and the decode chunks' HLO (static trip counts: no device value read per token)."""

import re
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from hf_fixtures import hf_model_from_dir

from omni_jax.models.thinker import TextModel
from omni_jax.processing import chat
from omni_jax.serving import AudioChunk, Finished, QueueFull, Request, RequestError, TextDelta
from omni_jax.serving.scheduler import Engine
from omni_jax.speech import talker_sampling

SHORT = [{"role": "user", "content": "hi"}]
MID = [{"role": "user", "content": "tell me something about the sea"}]
LONG = [{"role": "system", "content": "you are a careful assistant that answers briefly"},
        {"role": "user", "content": "what is the colour of the sky on a clear summer day at noon"}]


@pytest.fixture(scope="module")
def engine(tiny_hf_dir):
    # prefill_chunk 16: every prompt here takes 2-4 prefill chunks; chunk_steps 4: rows stop mid-chunk.
    # Scanned layers (as the released model's): thinker layers 2-3 (after the DeepStack layers 0-1) and both
    # talker layers run as one lax.scan over the stacked KV cache; the greedy tokens below equal transformers'.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(TextModel, "scan_min_layers", 2)
        eng = Engine.from_dir(tiny_hf_dir, speech=True, max_context=128, max_slots=3, max_queue=8, chunk_steps=4,
                              prefill_chunk=16)
    assert eng.thinker.runs == {2: 4} and eng.speech.talker.runs == {0: 2}
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def hf(tiny_hf_dir):
    return hf_model_from_dir(tiny_hf_dir)


def greedy_request(engine, messages, n, **kw):
    return Request(chat.parse_messages(messages), max_new_tokens=n, sampling=engine.sampling(greedy=True), **kw)


def hf_greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.thinker.generate(input_ids=torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_concurrent_requests_equal_solo_and_transformers(engine, hf):
    """Five requests at once in 3 slots (two wait for a free slot): three greedy texts of different prompt
    lengths and budgets (5, 9, 14 tokens with 4-step chunks: rows stop inside chunks at different steps), a sampled
    text and a spoken reply. Greedy tokens equal transformers'; each request equals its own solo run; nothing
    compiles after warm-up."""
    compiled = engine.compilations
    sampled = Request(chat.parse_messages(MID), max_new_tokens=7,
                      sampling=engine.sampling(greedy=False, temperature=0.8, top_k=20, seed=3))
    speech = greedy_request(engine, SHORT, 6, speech=True, talker_max_new_tokens=9,
                            talker_sampling=talker_sampling(greedy=True))
    reqs = [greedy_request(engine, LONG, 5), greedy_request(engine, MID, 9), greedy_request(engine, SHORT, 14),
            sampled, speech]
    engine.start()
    try:
        handles = [engine.submit(r) for r in reqs]
        together = engine.drive(handles)
        solo = [engine.run(r) for r in reqs]
    finally:
        engine.shutdown()
    for events, alone in zip(together, solo):
        fin = events[-1]
        assert isinstance(fin, Finished) and fin.finish_reason == "length", fin
        assert fin.token_ids == alone[-1].token_ids
        assert "".join(e.text for e in events if isinstance(e, TextDelta)) == fin.text
    for (events, req) in zip(together[:3], reqs[:3]):
        fin = events[-1]
        assert len(fin.token_ids) == req.max_new_tokens
        assert fin.token_ids == hf_greedy(hf, fin.prompt_ids, req.max_new_tokens)
    assert together[3][-1].token_ids != hf_greedy(hf, together[3][-1].prompt_ids, 7)  # it did sample
    fin, alone = together[4][-1], solo[4][-1]
    assert fin.num_codec_frames == 8 and np.array_equal(fin.codes, alone.codes)
    wav = np.concatenate([e.samples for e in together[4] if isinstance(e, AudioChunk)])
    assert wav.shape == (8 * 1920 - 555,)
    np.testing.assert_array_equal(wav, np.concatenate([e.samples for e in solo[4] if isinstance(e, AudioChunk)]))
    assert engine.compilations == compiled


def test_cancel_frees_the_slot(engine):
    """Cancelling a running request ends it at once with Finished("cancelled") and frees its slot; a queued one
    is cancelled before it runs; the engine then serves new requests."""
    engine.start()
    try:
        long = engine.submit(greedy_request(engine, MID, 100))
        first = long.get(timeout=300)
        assert isinstance(first, TextDelta)
        long.cancel()
        events = list(long.events())
        assert events[-1].finish_reason == "cancelled" and len(events[-1].token_ids) < 100
        stats = engine.stats()
        assert stats["running"] == 0 and stats["finished_cancelled"] >= 1
        ok = engine.drive([engine.submit(greedy_request(engine, SHORT, 3))])[0]
        assert ok[-1].finish_reason == "length"
    finally:
        engine.shutdown()
    queued = engine.submit(greedy_request(engine, SHORT, 3))  # no loop running: it waits
    queued.cancel()
    engine.step()
    assert queued.done and list(queued.events())[-1].finish_reason == "cancelled"


def test_stop_strings_and_validation(engine):
    base = engine.run(greedy_request(engine, MID, 8))[-1]
    stop = base.text[3:5]
    assert stop and stop not in base.text[:4]
    events = engine.run(greedy_request(engine, MID, 8, stop=(stop,)))
    fin = events[-1]
    assert fin.finish_reason == "stop" and fin.text == base.text[:base.text.index(stop)]
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == fin.text

    def bad(param, **kw):
        with pytest.raises(RequestError) as e:
            engine.submit(greedy_request(engine, SHORT, kw.pop("n", 4), **kw))
        assert e.value.param == param, e.value
        return str(e.value)

    assert "chelsie, ethan" in bad("speaker", speech=True, speaker="Nobody").lower()
    assert "exceeds the model's context of 128" in bad("messages", n=120)
    assert "max_new_tokens must be >= 1" in bad("max_tokens", n=0)
    engine.max_queue, saved = 0, engine.max_queue
    try:
        with pytest.raises(QueueFull):
            engine.submit(greedy_request(engine, SHORT, 2))
    finally:
        engine.max_queue = saved


def _wav(path, seconds, freq):
    """A tone with some noise, float WAV at 16 kHz; returns the path."""
    import soundfile as sf

    t = np.arange(int(seconds * 16000)) / 16000
    wave = 0.4 * np.sin(2 * np.pi * freq * t) + 0.05 * np.random.RandomState(int(freq)).randn(t.size)
    sf.write(path, wave.astype(np.float32), 16000, subtype="FLOAT")
    return str(path)


def hf_greedy_audio(hf, ids, audio, n):
    """transformers' thinker.generate on our prompt ids and log-mel features (both checked against its processor
    in test_multimodal_generate.py / test_audio_features.py)."""
    feats, frames = audio
    mask = (np.arange(feats.shape[-1])[None] < np.asarray(frames)[:, None]).astype(np.int64)
    with torch.no_grad():
        out = hf.thinker.generate(input_ids=torch.tensor([ids]), input_features=torch.from_numpy(feats),
                                  feature_attention_mask=torch.from_numpy(mask), max_new_tokens=n, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_audio_of_new_lengths_compiles_nothing(engine, hf, tmp_path):
    """Audio inputs are bucketed (whole attention windows, doubling up to the engine's max_audio_seconds) and each
    audio is encoded alone, so after warm-up audio of lengths never seen (0.6 s; 3.4 s over four chunks; two audios
    of 1.7 s and 0.9 s in one prompt, whose partial chunks depend on each other, P5) compiles nothing and gives
    transformers' greedy tokens. Audio longer than the largest bucket is refused with a one-line error naming the
    limit, before anything compiles."""
    from omni_jax.prompt import prepare_thinker_prompt
    from omni_jax.serving.engine import AudioTooLongError

    assert engine.thinker.audio_buckets == [8, 10] and engine.max_audio_seconds == 10  # context 128: 13 tokens / s
    compiled = engine.compilations
    cases = [[0.6], [3.4], [1.7, 0.9]]
    for i, seconds in enumerate(cases):
        parts = [{"type": "audio", "path": _wav(tmp_path / f"a{i}_{j}.wav", s, 200 + 90 * j + 40 * i)}
                 for j, s in enumerate(seconds)]
        messages = chat.parse_messages([{"role": "user", "content": [*parts, {"type": "text", "text": "what?"}]}])
        fin = engine.run(Request(messages, max_new_tokens=6, sampling=engine.sampling(greedy=True)))[-1]
        assert fin.finish_reason == "length", fin
        prompt = prepare_thinker_prompt(engine.tokenizer, engine.cfg, messages)
        assert fin.prompt_ids == prompt.input_ids and prompt.audio[0].shape[0] == len(seconds)
        assert fin.token_ids == hf_greedy_audio(hf, fin.prompt_ids, prompt.audio, 6), seconds
    assert engine.compilations == compiled
    # The served embeddings (bucketed, one audio per call, merged per piece) equal the model's joint encoding (the
    # reference's, tests/test_audio_encoder.py) to fp32 rounding; greedy tokens alone would not see P5's leak.
    th = engine.thinker
    joint = jax.jit(lambda state, ids, a: nnx.merge(th.graphdef, state).input_embeddings(ids, audio=a)[0])(
        th.state, jnp.asarray([prompt.input_ids]), prompt.audio)
    np.testing.assert_allclose(th.media_embeds(prompt.input_ids, audio=prompt.audio)[0], joint[0], rtol=1e-5,
                               atol=1e-5)
    compiled = engine.compilations

    long = chat.parse_messages([{"role": "user", "content": [{"type": "audio",
                                                              "path": _wav(tmp_path / "long.wav", 10.5, 300)}]}])
    with pytest.raises(RequestError, match="more than the limit of 10 s") as e:
        engine.submit(Request(long, max_new_tokens=2))
    assert e.value.param == "messages" and "\n" not in str(e.value)
    with pytest.raises(AudioTooLongError, match=r"at most 10 s \(max_audio_seconds"):  # the engine's own guard
        engine.thinker.media_embeds([0], audio=(np.zeros((1, 128, 1001), np.float32), np.array([1001])))
    assert engine.compilations == compiled


def test_warmup_image_sizes_cover_images_of_that_grid(engine, tmp_path):
    """warmup(image_sizes=...) compiles the vision encoder for those sizes: afterwards an image of another pixel size
    that resizes to the same grid (60x66 -> 64x64), alone or twice in one prompt (each image is encoded alone),
    compiles nothing. Without the warm-up it would (control: an image of a new grid compiles)."""
    from PIL import Image

    engine.thinker.warmup(deepstack_levels=2, image_sizes=[(64, 64)])
    compiled = engine.compilations
    paths = []
    for i, size in enumerate([(66, 60), (66, 60), (96, 64)]):  # PIL sizes are (width, height)
        paths.append(str(tmp_path / f"im{i}.png"))
        Image.fromarray(np.random.RandomState(i).randint(0, 255, (size[1], size[0], 3), np.uint8)).save(paths[-1])

    def ask(*images):
        content = [*({"type": "image", "path": p} for p in images), {"type": "text", "text": "what is it?"}]
        return engine.run(Request(chat.parse_messages([{"role": "user", "content": content}]), max_new_tokens=2,
                                  sampling=engine.sampling(greedy=True)))[-1]

    assert ask(paths[0]).finish_reason == "length" and ask(paths[0], paths[1]).finish_reason == "length"
    assert engine.compilations == compiled
    ask(paths[2])
    assert engine.compilations > compiled


def while_loops(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines() if re.search(r"\swhile\(", line)]


def reads_device_data_per_step(hlo: str) -> bool:
    """True if some while loop of a compiled module has no static trip count (its condition depends on data)."""
    return any("known_trip_count" not in line for line in while_loops(hlo))


def test_decode_chunks_have_static_trip_counts(engine):
    """The compiled thinker and talker decode chunks: every while loop has a trip count known at compile time,
    i.e. its condition reads only its counter. Control: a data-dependent `while_loop` (the previous decode loop's
    `step < steps & ~all(finished)`) is caught."""
    th = engine.thinker
    hlo = th._decode.lower(th.state, th.stacks, th.cache, th.dstate).compile().as_text()
    assert while_loops(hlo) and not reads_device_data_per_step(hlo)
    assert any(f'"n":"{th.chunk_steps}"' in line for line in while_loops(hlo))
    tk = engine.speech.talker
    args = (tk.state, tk.stacks, tk.cache, tk.dstate, jnp.zeros((tk.slots, tk.chunk_steps), jnp.int32),
            jnp.zeros(tk.slots, jnp.int32), tk.thinker_embed)
    hlo = tk._decode.lower(*args).compile().as_text()
    assert while_loops(hlo) and not reads_device_data_per_step(hlo)

    def old_style(x):
        return jax.lax.while_loop(lambda c: (c[0] < 8) & ~jnp.all(c[1] > 5.0),
                                  lambda c: (c[0] + 1, c[1] * 1.5), (0, x))[1]

    assert reads_device_data_per_step(jax.jit(old_style).lower(jnp.ones(4)).compile().as_text())


def test_engine_thread_serves_concurrent_clients(engine):
    """Clients on several threads; the loop in its own thread; each gets its own complete result."""
    engine.start()
    results = {}
    try:
        def client(i, msgs, n):
            results[i] = engine.drive([engine.submit(greedy_request(engine, msgs, n))])[0][-1]

        threads = [threading.Thread(target=client, args=(i, m, n)) for i, (m, n) in
                   enumerate([(SHORT, 3), (MID, 6), (LONG, 4), (SHORT, 5)])]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
    finally:
        engine.shutdown()
    assert [len(results[i].token_ids) for i in range(4)] == [3, 6, 4, 5]
    assert results[3].token_ids[:3] == results[0].token_ids

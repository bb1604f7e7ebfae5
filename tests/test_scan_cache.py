"""Prefill and decode with the decoder layers scanned over a stacked KV cache ([L, B, S, KV, D], carried through
lax.scan and written in place) equal the unrolled layers, for the thinker's and the talker's serving slots (fp32,
tiny models forced to scan with scan_min_layers=2), and the compiled decode chunk holds no copy of the cache."""

import jax
import numpy as np
import pytest
from flax import nnx

from omni_jax.config import preset
from omni_jax.models.talker import Talker
from omni_jax.models.thinker import LayerRunError, Thinker
from omni_jax.sampling import SamplingParams
from omni_jax.serving.engine import ThinkerSlots
from omni_jax.serving.speech import TalkerSlots

GREEDY = SamplingParams(temperature=0.0)


def _scans(fn, *args) -> int:
    return str(jax.make_jaxpr(fn)(*args)).count(" scan[")


@pytest.fixture(scope="module")
def thinker():
    return Thinker(preset("tiny").thinker_config, rngs=nnx.Rngs(0), with_encoders=False)


def _thinker_run(thinker, scan_min):
    """Prefill a prompt of embeddings with DeepStack features (collecting hidden states 0 and 2) into slot 1, then
    a decode chunk."""
    thinker.model.scan_min_layers = scan_min
    ts = ThinkerSlots(thinker, slots=3, context=64, stop_ids=(), chunk_steps=4, prefill_chunk=32, collect=(0, 2))
    rng = np.random.default_rng(0)
    pos = np.broadcast_to(np.arange(32, dtype=np.float32), (3, 32)).copy()
    embeds = rng.normal(size=(32, 64)).astype(np.float32)
    deepstack = [0.3 * rng.normal(size=(32, 64)).astype(np.float32) for _ in range(2)]
    logits, hidden = ts.prefill(1, 0, pos, embeds=embeds, deepstack=deepstack, last=29)
    ts.insert(1, tok=int(np.argmax(np.asarray(logits))), idx=30, delta=0.0, remaining=12, seed=1, count=1,
              sampling=GREEDY)
    chunks = [ts.decode()[0]]
    scans = _scans(lambda st, sk, c, d: ts._decode_impl(st, sk, c, d), ts.state, ts.stacks, ts.cache, ts.dstate)
    return ts, [np.asarray(x) for x in (logits, hidden[0], hidden[2])], chunks, scans


def test_thinker_slots_scanned_equal_unrolled(thinker):
    _, outs0, chunks0, scans0 = _thinker_run(thinker, 100)
    ts, outs1, chunks1, scans1 = _thinker_run(thinker, 2)
    assert ts.runs == {2: 4} and set(ts.stacks) == {2}  # layers 0-1 take DeepStack: unrolled; 2..3 scanned
    assert scans1 == scans0 + 1  # one layer scan (the decode chunk's fori_loop is a scan in both)
    for a, b in zip(outs1, outs0):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    for a, b in zip(chunks1, chunks0):
        np.testing.assert_array_equal(a, b)
    assert (chunks1[0][1] >= 0).all() and (chunks1[0][[0, 2]] == -1).all()  # only slot 1 decodes


def test_decode_chunk_holds_no_cache_copy(thinker):
    """The scan carries the stacked cache and writes its layer's rows in place: the compiled decode chunk's
    temporaries stay below one copy of the cache (XLA on CPU; the xla attention reads a layer's slice), also for
    the one-slot bucket."""
    thinker.model.scan_min_layers = 2
    ts = ThinkerSlots(thinker, slots=4, context=1024, stop_ids=(), chunk_steps=2, prefill_chunk=256)
    assert ts.runs == {2: 4}
    cache_bytes = 2 * ts.cache[0].nbytes
    assert ts.row_buckets == [1, 2, 4]
    for rows in (4, 1):  # all slots; the first slot only (a lone request: its rows are sliced out, written back)
        compiled = ts._decode.lower(ts.state, ts.stacks, ts.cache, ts.dstate, rows=rows).compile()
        mem = compiled.memory_analysis()
        assert mem.temp_size_in_bytes < cache_bytes / 2
        assert mem.alias_size_in_bytes >= cache_bytes  # the donated cache is updated in place


def test_engine_takes_over_the_scanned_layers():
    """release_module: the stacks replace the module's arrays of the scanned layers (no second copy); the module
    then refuses to run them, and stacks that do not fit a call are refused."""
    thinker = Thinker(preset("tiny").thinker_config, rngs=nnx.Rngs(0), with_encoders=False)
    thinker.model.scan_min_layers = 2
    before = [np.asarray(thinker.model.layers[j].self_attn.q_proj.kernel[...]) for j in (2, 3)]
    ts = ThinkerSlots(thinker, slots=1, context=32, stop_ids=(), prefill_chunk=16, release_module=True)
    for k, w in enumerate(before):
        np.testing.assert_array_equal(np.asarray(ts.stacks[2]["self_attn"]["q_proj"]["kernel"][...][k]), w)
    assert [len(jax.tree.leaves(nnx.state(layer))) > 0 for layer in thinker.model.layers] == [True, True, False, False]
    x = np.zeros((1, 16, 64), np.float32)
    pos = np.zeros((3, 1, 16), np.float32)
    with pytest.raises(LayerRunError, match="handed over to a serving engine"):
        thinker.model(x, pos, None)
    model = nnx.merge(ts.graphdef, ts.state)
    with pytest.raises(LayerRunError, match="cannot take DeepStack"):
        model.model(x, pos, None, deepstack=[x, x, x], stacks=ts.stacks)


@pytest.mark.slow  # the default suite runs the talker scanned in test_speech_batch.py (codes equal transformers')
def test_talker_prefill_scanned_equal_unrolled():
    """The talker's slots (decode: tests/test_speech_batch.py and tests/test_engine.py run the talker scanned and
    compare its codes with transformers' / the solo runs)."""
    cfg = preset("tiny")
    talker = Talker(cfg.talker_config, rngs=nnx.Rngs(1))
    embed = np.zeros((cfg.thinker_config.text_config.vocab_size, 64), np.float32)
    prompt = np.random.default_rng(3).normal(size=(16, 32)).astype(np.float32)
    pos = np.broadcast_to(np.arange(16, dtype=np.float32), (3, 16)).copy()
    runs = []
    for scan_min in (100, 2):
        talker.model.scan_min_layers = scan_min
        tk = TalkerSlots(talker, embed, slots=2, context=32, chunk_steps=2, prefill_chunk=16)
        tk.prefill(0, 0, prompt, pos, 15)
        logits, hidden = tk.prefill(1, 0, prompt[::-1].copy(), pos, 12)
        runs.append((tk.runs, np.asarray(logits), np.asarray(hidden), [np.asarray(c) for c in tk.cache]))
    (r0, l0, h0, c0), (r1, l1, h1, c1) = runs
    assert (r0, r1) == ({}, {0: 2})
    np.testing.assert_allclose(l1, l0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(h1, h0, rtol=1e-5, atol=1e-5)
    for a, b in zip(c1, c0):  # both slots' rows of both layers, written in place
        assert a.shape == (2, 2, 32, 2, 8) and np.abs(b[:, :, :16]).min(axis=(2, 3, 4)).all()
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

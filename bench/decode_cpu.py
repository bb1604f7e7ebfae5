"""Thinker decode speed of the serving engine's slots (omni_jax/serving/engine.py ThinkerSlots) on a tiny-config
variant big enough for the layer loop to matter: scanned vs unrolled decoder layers with every slot active, and a
lone request in an engine of `--slots` slots with and without slot buckets.

    python bench/decode_cpu.py --layers 16 --slots 8 --context 1024

Engines are built once and timed in alternating rounds (`--rounds` of `--chunks` decode chunks); printed: the
median tokens/s of each and the seconds its first prefill + decode took (compilation). Random weights, fp32,
greedy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

import numpy as np
from flax import nnx

from omni_jax.config import preset
from omni_jax.models.thinker import Thinker
from omni_jax.sampling import SamplingParams
from omni_jax.serving.engine import ThinkerSlots


def variant(layers: int, hidden: int):
    cfg = preset("tiny").thinker_config
    heads = hidden // 32
    text = dataclasses.replace(cfg.text_config, num_hidden_layers=layers, hidden_size=hidden,
                               num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1), head_dim=32,
                               moe_intermediate_size=hidden // 2, intermediate_size=2 * hidden,
                               mrope_section=(4, 6, 6))
    return dataclasses.replace(cfg, text_config=text,
                               vision_config=dataclasses.replace(cfg.vision_config, out_hidden_size=hidden),
                               audio_config=dataclasses.replace(cfg.audio_config, output_dim=hidden))


def engine(thinker, *, slots: int, active: int, context: int, scan: bool, buckets: bool):
    """A ThinkerSlots with `active` requests (slots 0..active-1) prefilled and decoding; (engine, seconds)."""
    t0 = time.perf_counter()
    ts = ThinkerSlots(thinker, slots=slots, context=context, stop_ids=(), chunk_steps=16, prefill_chunk=64,
                      scan_layers=scan, slot_buckets=buckets)
    pos = np.broadcast_to(np.arange(64, dtype=np.float32), (3, 64)).copy()
    for s in range(active):
        ts.prefill(s, 0, pos, ids=np.arange(64, dtype=np.int32) % 400, last=63)
        ts.insert(s, tok=1, idx=64, delta=0.0, remaining=10 ** 6, seed=s, count=1,
                  sampling=SamplingParams(temperature=0.0))
    ts.decode()
    return ts, time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--chunks", type=int, default=3)
    a = ap.parse_args()
    thinker = Thinker(variant(a.layers, a.hidden), rngs=nnx.Rngs(0), with_encoders=False)
    thinker.model.scan_min_layers = 8
    cases = {"all slots, scanned": dict(active=a.slots, scan=True, buckets=True),
             "all slots, unrolled": dict(active=a.slots, scan=False, buckets=True),
             "lone request, slot buckets": dict(active=1, scan=True, buckets=True),
             "lone request, all slots decoded": dict(active=1, scan=True, buckets=False)}
    built = {name: engine(thinker, slots=a.slots, context=a.context, **kw) for name, kw in cases.items()}
    rates = {name: [] for name in built}
    for _ in range(a.rounds):
        for name, (ts, _) in built.items():
            t0 = time.perf_counter()
            for _ in range(a.chunks):
                ts.decode()
            rates[name].append(a.chunks * 16 * cases[name]["active"] / (time.perf_counter() - t0))
    print(json.dumps({name: {"tokens_per_s": round(statistics.median(r), 1), "first_call_s": round(built[name][1], 1)}
                      for name, r in rates.items()}, indent=1))


if __name__ == "__main__":
    main()

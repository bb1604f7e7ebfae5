"""Device checks in one run: correctness on the accelerator first, then timings, a short table last.

    python bench/gpu_suite.py [--quick] [--out DIR] [--skip hf_medium,full_width]

Sections (each prints one JSON line prefixed "RESULT" and is collected into DIR/gpu_suite.json):
  1. moe_correctness   every expert-FFN implementation vs the dense oracle on the device (fp32, highest precision).
  2. thinker_parity    a small random thinker written by transformers: last-position logits of omni_jax vs
                       transformers, both on the device in fp32 (TF32 off), and 20 greedy tokens.
  3. moe_timing        one MoE layer at the released width (128 experts, top-8, hidden 2048, expert inner 768, bf16)
                       for decode (1 and 4 tokens) and prefill (2048 / 8192 tokens), each implementation.
  4. hf_medium         thinker prefill and greedy decode tokens/s vs transformers on the same device (bf16).
  5. full_width        released thinker dimensions with 4 layers (bf16, random weights made on the device):
                       prefill / decode speed and peak device memory; per-layer figures for the 48-layer model.
  6. speech_full       released talker + code predictor + Code2Wav (bf16, random weights): talker prefill, ms per
                       80 ms codec frame, time to the first streamed audio chunk, real-time factor.
  7. thinker_48        the whole released 48-layer thinker (bf16, 61 GB of random weights on the device):
                       prefill and decode speed, peak memory.
`--quick` shrinks every size so the whole script runs on a CPU in a few minutes (a dry run before a lease).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

RESULTS: dict[str, dict] = {}


def record(name: str, **kw):
    RESULTS[name] = kw
    print("RESULT", json.dumps({"section": name, **kw}), flush=True)


def timeit(fn, *args, n: int = 10, warm: int = 2):
    import jax

    for _ in range(warm):
        jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def peak_bytes():
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def moe_inputs(n, h, i, e, k, dtype, seed=0):
    import jax.numpy as jnp

    r = np.random.default_rng(seed)
    x = r.normal(size=(n, h)).astype(np.float32)
    idx = np.argsort(-r.normal(size=(n, e)), axis=1)[:, :k].astype(np.int32)
    w = r.random((n, k)).astype(np.float32)
    w /= w.sum(1, keepdims=True)
    scale = 1 / np.sqrt(h)
    # expert weights in the model layout: gate/up [E, I, H], down [E, H, I] (torch Linear [out, in])
    ws = [r.normal(size=s).astype(np.float32) * scale for s in ((e, i, h), (e, i, h), (e, h, i))]
    return tuple(jnp.asarray(a, dtype) if a.dtype == np.float32 else jnp.asarray(a) for a in (x, idx, w, *ws))


# ------------------------------------------------------------------------------------------------ 1. correctness
def moe_correctness(q):
    import jax
    import jax.numpy as jnp

    from omni_jax.kernels.moe import api

    out = {}
    with jax.default_matmul_precision("highest"):
        for n in (3, 300):
            args = moe_inputs(n, 256 if not q else 32, 128 if not q else 16, 16, 4, jnp.float32, seed=n)
            ref = np.asarray(jax.jit(lambda *a: api.expert_ffn(*a, impl="dense"))(*args), np.float64)
            for impl in ("sorted", "tiled", "bucketed", "slices", "gather"):
                if impl == "slices" and n > 16:
                    continue
                got = np.asarray(jax.jit(lambda *a, impl=impl: api.expert_ffn(*a, impl=impl))(*args), np.float64)
                out[f"{impl}_n{n}"] = float(np.abs(got - ref).max() / np.abs(ref).max())
    worst = max(out.values())
    record("moe_correctness", max_rel_err=worst, per_impl=out, ok=worst < 1e-5)


def _hf_thinker(hidden, layers, experts, top_k, inner, heads, kv, vocab, d, seed=0):
    import torch
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    from omni_jax import config as C

    base = C.tiny(enable_audio_output=False)
    text = base.text.replace(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                             num_key_value_heads=kv, head_dim=64, mrope_section=(12, 10, 10),
                             moe_intermediate_size=inner, num_experts=experts, num_experts_per_tok=top_k,
                             vocab_size=vocab)
    thinker = base.thinker_config.replace(
        text_config=text, audio_config=base.thinker_config.audio_config.replace(output_dim=hidden),
        vision_config=base.thinker_config.vision_config.replace(out_hidden_size=hidden))
    cfg = base.replace(thinker_config=thinker)
    torch.manual_seed(seed)
    hf = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**cfg.to_hf())).eval()
    hf.save_pretrained(d)
    return hf


def thinker_parity(q, dev):
    import jax
    import jax.numpy as jnp
    import torch

    from omni_jax.checkpoint.hf import load_hf
    from omni_jax.generate import ThinkerGenerator, text_prompt_batch
    from omni_jax.sampling import SamplingParams

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    with tempfile.TemporaryDirectory() as d:
        hf = _hf_thinker(256 if not q else 128, 4, 16, 4, 128, 4, 2, 1024, d)
        ids = np.random.RandomState(1).randint(0, 1000, (1, 64))
        hf = hf.to(dev)
        with torch.no_grad():
            x = torch.tensor(ids, device=dev)
            hl = hf.thinker(input_ids=x).logits[0, -1].float().cpu().numpy()
            htoks = hf.thinker.generate(input_ids=x, max_new_tokens=20, min_new_tokens=20,
                                        do_sample=False)[0, 64:].tolist()
        del hf
        with jax.default_matmul_precision("highest"):
            model, _ = load_hf(d, parts=("thinker",))
            gen = ThinkerGenerator(model.thinker)
            res = gen.generate(text_prompt_batch([ids[0].tolist()]), max_new_tokens=20, sampling=SamplingParams(),
                               return_logits=True)
    jl = np.asarray(res.logits[0][0], np.float64)
    rel = float(np.abs(jl - hl).max() / np.abs(hl).max())
    same = res.token_ids[0] == htoks
    record("thinker_parity", platform=jax.devices()[0].platform, logits_max_rel=rel, greedy_20_identical=same,
           ok=bool(rel < 1e-5 and same))
    del jnp


# ------------------------------------------------------------------------------------------------ 3. MoE timing
def moe_timing(q):
    import jax
    import jax.numpy as jnp

    from omni_jax.kernels.moe import api

    e, k, h, i = (128, 8, 2048, 768) if not q else (32, 4, 128, 64)
    rows = {}
    for n in ((1, 4, 2048, 8192) if not q else (1, 4, 256)):
        args = moe_inputs(n, h, i, e, k, jnp.bfloat16, seed=n)
        impls = ("slices", "gather", "sorted") if n * k <= e else ("sorted", "bucketed", "tiled")
        flops = 2 * 3 * n * k * h * i
        for impl in impls:
            f = jax.jit(lambda *a, impl=impl: api.expert_ffn(*a, impl=impl))
            t = timeit(f, *args, n=20 if n <= 4 else 10)
            rows[f"n{n}_{impl}"] = {"ms": t * 1e3, "active_tflops": flops / t / 1e12}
        rows[f"n{n}_auto_picks"] = api.choose_impl(n, k, e)
    record("moe_timing", experts=e, top_k=k, hidden=h, inner=i, dtype="bfloat16", rows=rows)


# ------------------------------------------------------------------------------------------------ 4. vs HF
def hf_medium(q, dev):
    import jax
    import jax.numpy as jnp
    import torch

    from omni_jax.checkpoint.hf import load_hf
    from omni_jax.generate import ThinkerGenerator, text_prompt_batch
    from omni_jax.sampling import SamplingParams

    hidden, layers, experts, top_k, inner, heads, kv, vocab = ((1024, 6, 32, 8, 512, 16, 4, 32768) if not q
                                                               else (128, 2, 8, 2, 64, 2, 1, 512))
    prompt, new = (1024, 128) if not q else (64, 16)
    with tempfile.TemporaryDirectory() as d:
        hf = _hf_thinker(hidden, layers, experts, top_k, inner, heads, kv, vocab, d)
        ids = np.random.RandomState(0).randint(0, vocab - 10, (1, prompt))
        hf = hf.to(dev, torch.bfloat16)
        x = torch.tensor(ids, device=dev)
        sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
        with torch.no_grad():
            for _ in range(2):
                hf.thinker(input_ids=x)
            sync()
            t = time.perf_counter()
            for _ in range(3):
                hf.thinker(input_ids=x)
            sync()
            hp = (time.perf_counter() - t) / 3
            hf.thinker.generate(input_ids=x, max_new_tokens=4, do_sample=False)
            sync()
            t = time.perf_counter()
            out = hf.thinker.generate(input_ids=x, max_new_tokens=new, min_new_tokens=new, do_sample=False)
            sync()
            hd = (time.perf_counter() - t - hp) / (new - 1)
        htoks = out[0, prompt:].tolist()
        del hf
        model, _ = load_hf(d, parts=("thinker",), dtype=jnp.bfloat16)
    gen = ThinkerGenerator(model.thinker, prefill_chunk=prompt)
    batch = text_prompt_batch([ids[0].tolist()], min_bucket=prompt)
    greedy = SamplingParams()
    gen.generate(batch, max_new_tokens=new, sampling=greedy)
    jp = timeit(lambda: gen.prefill(batch, max_new_tokens=new), n=5)
    t = time.perf_counter()
    res = gen.generate(batch, max_new_tokens=new, sampling=greedy)
    jd = (time.perf_counter() - t - jp) / (new - 1)
    jt = res.token_ids[0]
    agree = float(np.mean([a == b for a, b in zip(jt, htoks)]))
    record("hf_medium", config=dict(hidden=hidden, layers=layers, experts=experts, top_k=top_k, inner=inner,
                                    prompt=prompt, new=new, dtype="bfloat16"),
           jax_prefill_tok_s=prompt / jp, hf_prefill_tok_s=prompt / hp, prefill_ratio=hp / jp,
           jax_decode_tok_s=1 / jd, hf_decode_tok_s=1 / hd, decode_ratio=hd / jd, greedy_agreement_bf16=agree,
           first_divergence=next((j for j, (a, b) in enumerate(zip(jt, htoks)) if a != b), None))
    del jax


# ------------------------------------------------------------------------------------------------ 5. full width
def full_width(q):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from omni_jax import config as C
    from omni_jax.generate import ThinkerGenerator, text_prompt_batch
    from omni_jax.models.thinker import Thinker
    from omni_jax.sampling import SamplingParams

    layers = 4 if not q else 2
    rc = C.released_30b_a3b(enable_audio_output=False) if not q else C.tiny(enable_audio_output=False)
    tc = rc.thinker_config
    tc = tc.replace(text_config=tc.text_config.replace(num_hidden_layers=layers))
    t0 = time.perf_counter()
    th = Thinker(tc, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), with_encoders=False)
    jax.block_until_ready(nnx.state(th))
    init_s = time.perf_counter() - t0
    nbytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(th)))
    gen = ThinkerGenerator(th, prefill_chunk=8192 if not q else 64)
    out = {"layers": layers, "param_bytes": nbytes, "init_s": init_s}
    vocab = tc.text_config.vocab_size
    for prompt in ((2048, 8192) if not q else (64,)):
        new = 32
        ids = np.random.RandomState(prompt).randint(0, vocab // 2, prompt).tolist()
        batch = text_prompt_batch([ids], min_bucket=prompt)
        t = time.perf_counter()
        gen.generate(batch, max_new_tokens=new, sampling=SamplingParams())
        first = time.perf_counter() - t
        pf = timeit(lambda batch=batch, new=new: gen.prefill(batch, max_new_tokens=new), n=3, warm=1)
        t = time.perf_counter()
        gen.generate(batch, max_new_tokens=new, sampling=SamplingParams())
        dec = (time.perf_counter() - t - pf) / (new - 1)
        out[f"prompt{prompt}"] = {"compile_and_first_s": first, "prefill_s": pf, "prefill_tok_s": prompt / pf,
                                  "decode_ms_per_token": dec * 1e3, "prefill_ms_per_layer": pf * 1e3 / layers,
                                  "decode_ms_per_layer": dec * 1e3 / layers}
    out["peak_device_bytes"] = peak_bytes()
    record("full_width", **out)


def speech_full(q):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from omni_jax import config as C
    from omni_jax.models.code2wav import Code2Wav
    from omni_jax.models.talker import Talker
    from omni_jax.models.thinker import Thinker
    from omni_jax.speech import SAMPLE_RATE, talker_sampling

    cfg = C.released_30b_a3b() if not q else C.tiny()
    tc = cfg.thinker_config
    th = Thinker(tc.replace(text_config=tc.text_config.replace(num_hidden_layers=1)), dtype=jnp.bfloat16,
                 rngs=nnx.Rngs(0), with_encoders=False)  # only its token embedding is used (tts rows)
    talker = Talker(cfg.talker_config, dtype=jnp.bfloat16, rngs=nnx.Rngs(1))
    c2w = Code2Wav(cfg.code2wav_config, dtype=jnp.bfloat16, rngs=nnx.Rngs(2))
    n_talker = sum(x.size for x in jax.tree.leaves(nnx.state(talker)))
    n_c2w = sum(x.size for x in jax.tree.leaves(nnx.state(c2w)))
    from types import SimpleNamespace

    from omni_jax.inference import GenerationDefaults
    from omni_jax.serving.scheduler import Engine

    engine = Engine(SimpleNamespace(thinker=th, talker=talker, code2wav=c2w), cfg, None, GenerationDefaults(),
                    model_name="speech_full", max_slots=1, max_context=512, speech=True)
    sg = engine.speech  # the engine's speech stage (talker slots, chunked frames, streaming Code2Wav)
    r = np.random.default_rng(0)
    text = r.integers(1000, 30000, 60).tolist()
    nl = 198
    ids = [cfg.im_start_token_id, 872, nl, *text, cfg.im_end_token_id, nl, cfg.im_start_token_id,
           cfg.assistant_token_id, nl]
    gen = r.integers(1000, 30000, 40).tolist() + [cfg.im_end_token_id]
    rows = len(ids) + len(gen) - 1
    hid = tc.text_config.hidden_size
    he = (r.normal(size=(rows, hid)) * 0.02).astype(np.float32)
    ha = (r.normal(size=(rows, hid)) * 0.5).astype(np.float32)
    tp = sg.talker_prompt(ids, gen, he, ha, speaker="Ethan")
    greedy = talker_sampling(greedy=True)
    frames_n, k = 48, sg.talker.chunk_steps
    walls = {}
    for n in (k, frames_n):  # frames come in chunks of k: the difference of two runs is the per-frame cost
        for _ in range(2):  # first pass compiles
            t = time.perf_counter()
            got = sg.generate_codes(tp, max_new_tokens=n + 1, sampling=greedy).codes.shape[1]
            walls[n] = time.perf_counter() - t
    first = walls[k]
    per_frame = (walls[frames_n] - walls[k]) / (frames_n - k)
    for _ in range(2):
        t = time.perf_counter()
        st = sg.stream(tp, max_new_tokens=frames_n + 1, sampling=greedy, group_frames=4)
        chunk0 = next(st)
        first_chunk = time.perf_counter() - t
        samples = chunk0.samples.size + sum(c.samples.size for c in st)
        stream_total = time.perf_counter() - t
    audio_s = samples / SAMPLE_RATE
    record("speech_full", talker_params=int(n_talker), code2wav_params=int(n_c2w), frames=got,
           first_chunk_of_frames_s=first, ms_per_frame=per_frame * 1e3, first_chunk_s_group4=first_chunk,
           audio_s=audio_s, stream_wall_s=stream_total, real_time_factor=audio_s / stream_total,
           peak_device_bytes=peak_bytes())


def thinker_48(q):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from omni_jax import config as C
    from omni_jax.generate import ThinkerGenerator, text_prompt_batch
    from omni_jax.models.thinker import Thinker
    from omni_jax.sampling import SamplingParams

    tc = (C.released_30b_a3b(enable_audio_output=False) if not q else C.tiny(enable_audio_output=False)).thinker_config
    t0 = time.perf_counter()
    th = Thinker(tc, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), with_encoders=False)
    jax.block_until_ready(nnx.state(th))
    out = {"layers": tc.text_config.num_hidden_layers, "init_s": time.perf_counter() - t0,
           "param_bytes": sum(x.nbytes for x in jax.tree.leaves(nnx.state(th)))}
    prompt, new = (2048, 32) if not q else (64, 8)
    gen = ThinkerGenerator(th, prefill_chunk=prompt)
    ids = np.random.RandomState(0).randint(0, tc.text_config.vocab_size // 2, prompt).tolist()
    batch = text_prompt_batch([ids], min_bucket=prompt)
    t = time.perf_counter()
    gen.generate(batch, max_new_tokens=new, sampling=SamplingParams())
    out["compile_and_first_s"] = time.perf_counter() - t
    pf = timeit(lambda: gen.prefill(batch, max_new_tokens=new), n=3, warm=1)
    t = time.perf_counter()
    gen.generate(batch, max_new_tokens=new, sampling=SamplingParams())
    dec = (time.perf_counter() - t - pf) / (new - 1)
    out.update(prompt=prompt, prefill_s=pf, prefill_tok_s=prompt / pf, decode_ms_per_token=dec * 1e3,
               decode_tok_s=1 / dec, peak_device_bytes=peak_bytes())
    record("thinker_48", **out)


def table():
    lines = ["", "| section | figure |", "|---|---|"]
    for name, r in RESULTS.items():
        if "error" in r:
            lines.append(f"| {name} | ERROR {r['error'][:120]} |")
        elif name == "moe_correctness":
            lines.append(f"| {name} | max rel err {r['max_rel_err']:.2e} ok={r['ok']} |")
        elif name == "thinker_parity":
            lines.append(f"| {name} | logits rel {r['logits_max_rel']:.2e}, greedy20 same={r['greedy_20_identical']} |")
        elif name == "moe_timing":
            for key, v in r["rows"].items():
                if isinstance(v, dict):
                    lines.append(f"| moe {key} | {v['ms']:.3f} ms, {v['active_tflops']:.1f} TFLOP/s |")
                else:
                    lines.append(f"| moe {key} | {v} |")
        elif name == "hf_medium":
            lines.append(f"| prefill tok/s jax/hf | {r['jax_prefill_tok_s']:.0f} / {r['hf_prefill_tok_s']:.0f} = "
                         f"{r['prefill_ratio']:.2f}x |")
            lines.append(f"| decode tok/s jax/hf | {r['jax_decode_tok_s']:.1f} / {r['hf_decode_tok_s']:.1f} = "
                         f"{r['decode_ratio']:.2f}x |")
        elif name == "full_width":
            for key, v in r.items():
                if isinstance(v, dict):
                    lines.append(f"| full width {key} | prefill {v['prefill_tok_s']:.0f} tok/s "
                                 f"({v['prefill_ms_per_layer']:.2f} ms/layer), decode "
                                 f"{v['decode_ms_per_token']:.2f} ms/token ({v['decode_ms_per_layer']:.3f} ms/layer) |")
            lines.append(f"| full width memory | params {r['param_bytes'] / 2**30:.2f} GiB, peak "
                         f"{(r['peak_device_bytes'] or 0) / 2**30:.2f} GiB |")
        elif name == "speech_full":
            lines.append(f"| speech | {r['ms_per_frame']:.1f} ms per 80 ms frame, first chunk "
                         f"{r['first_chunk_s_group4'] * 1e3:.0f} ms, RTF {r['real_time_factor']:.1f}x |")
        elif name == "thinker_48":
            lines.append(f"| thinker 48 layers | prefill {r['prefill_tok_s']:.0f} tok/s, decode "
                         f"{r['decode_tok_s']:.1f} tok/s, peak {(r['peak_device_bytes'] or 0) / 2**30:.1f} GiB |")
    print("\n".join(lines))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.environ.get("OUT", "."))
    p.add_argument("--skip", default="")
    args = p.parse_args(argv)
    import jax
    import torch

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"jax {jax.__version__} {jax.devices()}; torch {torch.__version__} ({dev})", flush=True)
    import transformers

    print(f"transformers {transformers.__version__}", flush=True)
    skip = set(filter(None, args.skip.split(",")))
    sections = [("moe_correctness", lambda: moe_correctness(args.quick)),
                ("thinker_parity", lambda: thinker_parity(args.quick, dev)),
                ("moe_timing", lambda: moe_timing(args.quick)),
                ("hf_medium", lambda: hf_medium(args.quick, dev)),
                ("full_width", lambda: full_width(args.quick)),
                ("speech_full", lambda: speech_full(args.quick)),
                ("thinker_48", lambda: thinker_48(args.quick))]
    for name, fn in sections:
        if name in skip:
            continue
        t = time.perf_counter()
        try:
            fn()
        except Exception as e:  # keep going: one broken section must not cost the lease
            import traceback

            traceback.print_exc()
            record(name, error=f"{type(e).__name__}: {e}")
        print(f"[{name}] {time.perf_counter() - t:.1f} s", flush=True)
        with open(os.path.join(args.out, "gpu_suite.json"), "w") as f:  # after every section: a kill keeps them
            json.dump({"jax": jax.__version__, "torch": torch.__version__, "device": str(jax.devices()[0]),
                       "results": RESULTS}, f, indent=1)
    table()
    return 0


if __name__ == "__main__":
    sys.exit(main())

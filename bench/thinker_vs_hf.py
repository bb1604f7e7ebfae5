"""Thinker prefill and greedy decode throughput: omni_jax vs transformers, same config, same machine, same run.

    python bench/thinker_vs_hf.py [--hidden 384] [--layers 6] [--experts 32] [--prompt 256] [--new 64]

Both models hold identical random weights (written by transformers, loaded by omni_jax from the directory);
the script checks that their greedy tokens agree before timing. Prints tokens/s for both and the ratio.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

REPS = 5  # timed repetitions per figure (median)


def build(args, out_dir):
    import torch
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    from omni_jax import config as C

    base = C.tiny(enable_audio_output=False)
    heads = args.hidden // 64
    text = base.text.replace(hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=heads,
                             num_key_value_heads=max(1, heads // 4), head_dim=64, mrope_section=(12, 10, 10),
                             moe_intermediate_size=args.hidden // 2, num_experts=args.experts,
                             num_experts_per_tok=args.top_k, vocab_size=args.vocab)
    thinker = base.thinker_config.replace(
        text_config=text, audio_config=base.thinker_config.audio_config.replace(output_dim=args.hidden),
        vision_config=base.thinker_config.vision_config.replace(out_hidden_size=args.hidden))
    cfg = base.replace(thinker_config=thinker)
    torch.manual_seed(0)
    hf = Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**cfg.to_hf())).eval()
    hf.save_pretrained(out_dir)
    return hf


def time_hf(hf, ids, new):
    import torch

    x = torch.tensor(ids)
    with torch.no_grad():
        hf.thinker(input_ids=x)  # warm-up
        prefill = _median(lambda: hf.thinker(input_ids=x))
        hf.thinker.generate(input_ids=x, max_new_tokens=4, do_sample=False)
        total = _median(lambda: hf.thinker.generate(input_ids=x, max_new_tokens=new, min_new_tokens=new,
                                                    do_sample=False))
        out = hf.thinker.generate(input_ids=x, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    toks = out[0, x.shape[1]:].tolist()
    return prefill, max(total - prefill, 1e-9) / (new - 1), toks


def _median(fn, reps: int = REPS) -> float:
    """Median wall time of `reps` calls (the machine is shared: single runs move by tens of percent)."""
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def time_jax(path, ids, new, moe_impl="auto"):
    import jax

    from omni_jax.checkpoint.hf import load_hf
    from omni_jax.generate import ThinkerGenerator, text_prompt_batch
    from omni_jax.sampling import SamplingParams

    model, _ = load_hf(path, parts=("thinker",))
    gen = ThinkerGenerator(model.thinker, moe_impl=moe_impl, prefill_chunk=len(ids[0]))
    batch = text_prompt_batch([list(ids[0])], min_bucket=len(ids[0]))
    greedy = SamplingParams()
    gen.generate(batch, max_new_tokens=new, sampling=greedy)  # compile prefill + decode
    prefill = _median(lambda: jax.block_until_ready(gen.prefill(batch, max_new_tokens=new)))
    total = _median(lambda: gen.generate(batch, max_new_tokens=new, sampling=greedy))
    res = gen.generate(batch, max_new_tokens=new, sampling=greedy)
    return prefill, max(total - prefill, 1e-9) / (new - 1), res.token_ids[0]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=64)
    args = p.parse_args(argv)
    import jax
    import torch

    with tempfile.TemporaryDirectory() as d:
        hf = build(args, d)
        ids = np.random.RandomState(0).randint(0, 490, (1, args.prompt))
        hp, hd, htoks = time_hf(hf, ids, args.new)
        jp, jd, jtoks = time_jax(d, ids, args.new)
        # Decode with every expert touched (grouped matmul for one token) vs only the selected ones (auto).
        _, jd_grouped, _ = time_jax(d, ids, args.new, moe_impl="tiled")
    same = htoks == jtoks[:len(htoks)]
    print(f"config: hidden {args.hidden}, layers {args.layers}, experts {args.experts} top-{args.top_k}, "
          f"prompt {args.prompt}, new {args.new}; jax {jax.__version__} ({jax.devices()[0].platform}), "
          f"torch {torch.__version__}, {os.cpu_count()} cpus")
    print(f"greedy tokens identical: {same}")
    print(f"{'':10s} {'omni_jax':>12s} {'transformers':>14s} {'ratio':>8s}")
    print(f"{'prefill':10s} {args.prompt / jp:10.0f}/s {args.prompt / hp:12.0f}/s {hp / jp:7.2f}x")
    print(f"{'decode':10s} {1 / jd:10.1f}/s {1 / hd:12.1f}/s {hd / jd:7.2f}x")
    print(f"decode MoE path: selected experts only (auto) {1 / jd:.1f}/s vs grouped matmul over all experts "
          f"{1 / jd_grouped:.1f}/s ({jd_grouped / jd:.2f}x)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

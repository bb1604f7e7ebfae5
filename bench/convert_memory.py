"""Peak host memory of `omni-jax convert` on a bf16 checkpoint, against the checkpoint's size (issue 12).

    python bench/convert_memory.py [--layers 12] [--hidden 1024] [--workdir /tmp/convert_mem]

Writes a random bf16 HF directory of a scaled-up tiny thinker (the layers / hidden size given), then runs
`omni-jax convert` without --dtype in a fresh process for each case and reads that process's peak resident set
(getrusage ru_maxrss) against its resident set after importing everything convert uses (the constant every run
pays). Prints one JSON object per case.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_checkpoint(out: str, layers: int, hidden: int) -> None:
    import jax
    import jax.numpy as jnp
    import ml_dtypes
    import numpy as np
    from flax import nnx

    from omni_jax.checkpoint.assign import flat_params, get_value, set_value
    from omni_jax.checkpoint.hf import save_hf
    from omni_jax.config import tiny
    from omni_jax.models.omni import OmniModel

    base = tiny(enable_audio_output=False)
    th = base.thinker_config
    text = dataclasses.replace(th.text_config, hidden_size=hidden, num_hidden_layers=layers, head_dim=hidden // 8,
                               num_attention_heads=8, num_key_value_heads=2, moe_intermediate_size=hidden // 2,
                               intermediate_size=hidden * 2, mrope_section=(hidden // 64, 3 * hidden // 128,
                                                                          3 * hidden // 128))
    audio = dataclasses.replace(th.audio_config, output_dim=hidden)
    vision = dataclasses.replace(th.vision_config, out_hidden_size=hidden)
    cfg = dataclasses.replace(base, thinker_config=dataclasses.replace(th, text_config=text, audio_config=audio,
                                                                       vision_config=vision))
    model = nnx.eval_shape(lambda: OmniModel(cfg, dtype=jnp.bfloat16, rngs=nnx.Rngs(0), parts=("thinker",)))
    rng = np.random.default_rng(0)
    for var in flat_params(model).values():
        shape = get_value(var).shape
        set_value(var, jax.numpy.asarray((rng.standard_normal(shape, dtype=np.float32) * 0.02)
                                         .astype(ml_dtypes.bfloat16)))
    save_hf(model, cfg, out, max_shard_bytes=200 << 20, overwrite=True)


RUN = """
import json, resource, sys
import jax.numpy as jnp
from omni_jax import cli, inference  # noqa: F401  (everything convert imports, before the baseline)
from omni_jax.checkpoint import hf, orbax_io  # noqa: F401
import tqdm  # noqa: F401
jnp.zeros(1).block_until_ready()

def rss():
    with open("/proc/self/status") as f:
        return next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmRSS:"))

base, base_peak = rss(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
code = cli.main(sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"code": code, "base_rss": base, "base_peak": base_peak, "peak_rss": peak}))
"""


def run_case(argv: list[str]) -> dict:
    """Resident-set figures of a fresh process running `omni-jax` argv (after its imports: base_rss)."""
    r = subprocess.run([sys.executable, "-c", RUN, *argv], cwd=REPO, capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--workdir", default="/tmp/convert_mem")
    a = ap.parse_args()
    src = os.path.join(a.workdir, "bf16")
    if not os.path.exists(os.path.join(src, "config.json")):
        make_checkpoint(src, a.layers, a.hidden)
    from omni_jax.checkpoint import safetensors_io as S
    from omni_jax.checkpoint.hf import shard_files

    size = sum(os.path.getsize(f) for f in shard_files(src))
    largest = max(int(v.nbytes) for f in shard_files(src) for _, v in S.iter_tensors(f))
    for name, extra in (("hf, default 4GB shards", ["--to", "hf"]),
                        ("hf, 64MB shards", ["--to", "hf", "--max-shard-size", "64MB"]),
                        ("orbax", ["--to", "orbax"])):
        out = os.path.join(a.workdir, "out")
        shutil.rmtree(out, ignore_errors=True)
        r = run_case(["convert", "--model", src, "--out", out, *extra])
        mb = 2 ** 20
        print(json.dumps({"case": name, "checkpoint_mb": round(size / mb, 1), "largest_tensor_mb": largest / mb,
                          "rss_after_imports_mb": round(r["base_rss"] / mb, 1),
                          "peak_rss_mb": round(r["peak_rss"] / mb, 1),
                          "peak_above_imports_mb": round((r["peak_rss"] - r["base_rss"]) / mb, 1),
                          "above_imports_per_checkpoint": round((r["peak_rss"] - r["base_rss"]) / size, 2)}))

if __name__ == "__main__":
    main()

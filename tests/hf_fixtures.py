"""Tiny random Hugging Face Qwen3-Omni checkpoints on disk, for parity tests.

`build_tiny_hf_dir(out_dir, variant, layout, enable_audio_output, shard_size)` builds a
`Qwen3OmniMoeForConditionalGeneration` from an omni_jax config's `to_hf()` dict, re-initialises every parameter
with random values at random scales (HF's default init — std 0.02, zero biases, unit norms — hides mistakes),
saves it sharded, and adds the tiny tokenizer, chat template and processor settings written by omni_jax's own
writers. It then checks that transformers reads the directory back (tokenizer, and the processor when
torchvision can be imported).

Variants:
  "a": `omni_jax.config.tiny()`.
  "b": different shapes: text hidden 80 with 5 heads of head_dim 24 (head_dim != hidden/heads) and 1 kv head,
       6 experts top-3 without top-k renormalisation, 3 layers, mrope_section (6, 3, 3); a wider 3-layer audio
       encoder and a vision encoder with another DeepStack layout.
  "c": "a" with the talker reading the thinker's last layer (accept_hidden_layer = 4 = thinker depth), where the
       reference's hidden state is the final *normed* output.

The video processor of transformers needs torchvision; see `import_torchvision`, which runs when this module is
imported and must run before transformers is first imported. Tests that need it carry `@needs_torchvision`: they
skip without it locally and fail under `CI=true` (conftest.py), where .ci/run installs it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import pytest

from omni_jax import config as C
from omni_jax.processing.tiny_tokenizer import write_processor_config, write_tiny_tokenizer

VARIANTS = ("a", "b", "c")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Where a CPU-compatible torchvision may be installed with `pip install --no-deps --target DIR torchvision==0.29.1`
# (the wheels on the index are CUDA builds whose compiled ops do not load next to the CPU torch).
TORCHVISION_DIR = os.environ.get("OMNI_JAX_TORCHVISION_DIR", os.path.join(REPO_ROOT, "tmp", "torchvision"))
TORCHVISION_MISSING = ("transformers' processor needs torchvision; install a CPU-compatible one with "
                       f"`pip install --no-deps --target {TORCHVISION_DIR} torchvision==0.29.1`")
IN_CI = os.environ.get("CI", "").strip().lower() == "true"
# Marks a test that compares with transformers' processor (see conftest.pytest_runtest_setup).
needs_torchvision = pytest.mark.needs_torchvision


def import_torchvision() -> bool:
    """Make `import torchvision` work for transformers' video processor; False when it cannot.

    An installed, working torchvision is used as is. Otherwise a `--no-deps --target` install in
    TORCHVISION_DIR is put on sys.path after declaring the two operator schemas (nms, qnms) its Python code
    registers fake kernels for; the resize / normalise transforms the processors use are plain torch.
    """
    if os.environ.get("OMNI_JAX_HIDE_TORCHVISION") == "1":  # tests of the missing-torchvision behaviour
        return False
    if "torchvision" in sys.modules:
        return True
    try:
        import torchvision  # noqa: F401

        return True
    except Exception:  # absent, or a CUDA build whose compiled ops fail to load
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            sys.modules.pop(name)
    if not os.path.isdir(os.path.join(TORCHVISION_DIR, "torchvision")):
        return False
    import torch

    global _TV_LIBRARY
    if _TV_LIBRARY is None:
        _TV_LIBRARY = torch.library.Library("torchvision", "DEF")
        _TV_LIBRARY.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TV_LIBRARY.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    if TORCHVISION_DIR not in sys.path:
        sys.path.insert(0, TORCHVISION_DIR)
    try:
        import torchvision  # noqa: F401, F811

        return True
    except Exception:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            sys.modules.pop(name)
        return False


_TV_LIBRARY = None
# transformers decides once, when first imported, whether torchvision is available: make it importable first.
TORCHVISION_AVAILABLE = import_torchvision()


# ---------------------------------------------------------------------------------------------------------------
# Configs


def variant_config(variant: str = "a", enable_audio_output: bool = True) -> C.OmniConfig:
    """The omni_jax config of a fixture variant (validated by OmniConfig)."""
    base = C.tiny(enable_audio_output=enable_audio_output)
    if variant == "a":
        return base
    if variant == "c":
        depth = base.thinker_config.text_config.num_hidden_layers
        return dataclasses.replace(base, talker_config=dataclasses.replace(base.talker_config,
                                                                           accept_hidden_layer=depth))
    if variant != "b":
        raise ValueError(f"unknown fixture variant {variant!r}; expected one of {VARIANTS}")
    th = base.thinker_config
    hidden = 80
    text = dataclasses.replace(th.text_config, hidden_size=hidden, intermediate_size=112, num_hidden_layers=3,
                               num_attention_heads=5, num_key_value_heads=1, head_dim=24, mrope_section=(6, 3, 3),
                               moe_intermediate_size=40, num_experts=6, num_experts_per_tok=3,
                               norm_topk_prob=False)
    audio = dataclasses.replace(th.audio_config, d_model=48, encoder_attention_heads=4, encoder_ffn_dim=80,
                                encoder_layers=3, downsample_hidden_size=8, output_dim=hidden)
    vision = dataclasses.replace(th.vision_config, depth=4, hidden_size=48, intermediate_size=72, num_heads=4,
                                 out_hidden_size=hidden, num_position_embeddings=36, deepstack_visual_indexes=(1, 3))
    thinker = dataclasses.replace(th, text_config=text, audio_config=audio, vision_config=vision)
    talker = dataclasses.replace(base.talker_config, thinker_hidden_size=hidden, accept_hidden_layer=1)
    return dataclasses.replace(base, thinker_config=thinker, talker_config=talker)


# ---------------------------------------------------------------------------------------------------------------
# Random re-initialisation


def _is_norm_weight(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] == "weight" and any("norm" in p or p.startswith("ln_") for p in parts[:-1])


def reinit_randomly(model, seed: int) -> None:
    """Give every parameter random values at a random per-tensor scale.

    Matrices: normal / sqrt(fan_in) * U(0.3, 1.5) (output heads U(1.5, 3) so greedy argmax has clear margins);
    embeddings: normal * U(0.5, 1.5); norm weights: U(0.5, 1.5) (QK-norm U(0.8, 2.2), so attention is sharp and
    positions matter); biases: normal * U(0.05, 0.3); SnakeBeta log-scale alpha/beta: normal * 0.3; layer scales:
    U(0.05, 0.5).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)

    def u(lo, hi):
        return lo + (hi - lo) * torch.rand((), generator=gen).item()

    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.split(".")[-1]
            shape = tuple(p.shape)
            if _is_norm_weight(name):
                lo, hi = (0.8, 2.2) if ("q_norm" in name or "k_norm" in name) else (0.5, 1.5)
                val = lo + (hi - lo) * torch.rand(shape, generator=gen)
            elif leaf == "bias":
                val = torch.randn(shape, generator=gen) * u(0.05, 0.3)
            elif leaf in ("alpha", "beta"):
                val = torch.randn(shape, generator=gen) * 0.3
            elif leaf in ("scale", "gamma"):
                val = 0.05 + 0.45 * torch.rand(shape, generator=gen)
            elif len(shape) == 1:
                val = torch.randn(shape, generator=gen) * u(0.3, 1.0)
            elif "embed" in name.split(".")[-2] or "embedding" in name:
                val = torch.randn(shape, generator=gen) * u(0.5, 1.5)
            else:
                fan_in = shape[-1] if "experts" in name else math.prod(shape[1:])
                lo, hi = (1.5, 3.0) if ("lm_head" in name or "codec_head" in name) else (0.3, 1.5)
                val = torch.randn(shape, generator=gen) * (u(lo, hi) / math.sqrt(fan_in))
            if name.startswith("code2wav.decoder.") and name.endswith(".conv.weight") and shape[0] == 1:
                val = val * 0.1  # the final 1-channel conv: keep most waveform samples inside the [-1, 1] clamp
            p.copy_(val.to(p.dtype))


# ---------------------------------------------------------------------------------------------------------------
# Directory


def build_tiny_hf_model(variant: str = "a", enable_audio_output: bool = True, seed: int | None = None):
    """(omni_jax config, HF model in eval mode, fp32) for a variant, randomly re-initialised."""
    import torch
    from transformers import Qwen3OmniMoeConfig, Qwen3OmniMoeForConditionalGeneration

    cfg = variant_config(variant, enable_audio_output)
    seed = (1234 + VARIANTS.index(variant)) if seed is None else seed
    torch.manual_seed(seed)
    hf_cfg = Qwen3OmniMoeConfig(**cfg.to_hf())
    model = Qwen3OmniMoeForConditionalGeneration(hf_cfg).to(torch.float32)
    reinit_randomly(model, seed)
    return cfg, model.eval()


def build_tiny_hf_dir(out_dir: str | os.PathLike, variant: str = "a", layout: str = "v5",
                      enable_audio_output: bool = True, shard_size: str = "200KB", verify: bool = True) -> str:
    """Write a tiny random HF Qwen3-Omni checkpoint (sharded weights, tokenizer, processor settings)."""
    out_dir = os.fspath(out_dir)
    cfg, model = build_tiny_hf_model(variant, enable_audio_output)
    model.save_pretrained(out_dir, max_shard_size=shard_size)
    write_tiny_tokenizer(out_dir)
    write_processor_config(out_dir, layout)
    gen_path = os.path.join(out_dir, "generation_config.json")
    if not os.path.exists(gen_path):
        with open(gen_path, "w") as f:
            json.dump({"eos_token_id": [cfg.im_end_token_id], "pad_token_id": C.TINY_TOKENS["endoftext"]}, f,
                      indent=2)
    if verify:
        verify_hf_dir(out_dir)
    return out_dir


def relayout(src: str | os.PathLike, dst: str | os.PathLike, layout: str) -> str:
    """Copy a checkpoint directory and rewrite its processor settings in another layout."""
    import shutil

    src, dst = os.fspath(src), os.fspath(dst)
    shutil.copytree(src, dst, dirs_exist_ok=True)
    for name in ("processor_config.json", "preprocessor_config.json", "video_preprocessor_config.json",
                 "chat_template.json", "chat_template.jinja"):
        if os.path.exists(os.path.join(dst, name)):
            os.remove(os.path.join(dst, name))
    write_processor_config(dst, layout)  # v5 also writes chat_template.jinja
    return dst


def verify_hf_dir(path: str) -> None:
    """transformers reads the directory: the tokenizer always; the processor (chat template, placeholder
    expansion) when torchvision can be imported."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    for name, tid in (("image_token", "image_pad"), ("audio_token", "audio_pad"), ("video_token", "video_pad")):
        if tok.convert_tokens_to_ids(getattr(tok, name)) != C.TINY_TOKENS[tid]:
            raise AssertionError(f"{path}: HF tokenizer {name} is not id {C.TINY_TOKENS[tid]}")
    if not os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        raise AssertionError(f"{path}: weights were not sharded")
    if not TORCHVISION_AVAILABLE:
        if IN_CI:
            raise AssertionError(f"{path}: cannot check the HF processor: {TORCHVISION_MISSING}")
        return
    proc = load_hf_processor(path)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}]
    text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    ids = proc(text=text, return_tensors="np")["input_ids"][0].tolist()
    t = C.TINY_TOKENS
    if ids[:3] != [t["im_start"], t["user"], 198] or ids[-3:] != [t["im_start"], t["assistant"], 198]:
        raise AssertionError(f"{path}: HF processor prompt ids look wrong: {ids}")


def load_hf_processor(path: str):
    """`AutoProcessor.from_pretrained(path)` (needs torchvision for the video processor)."""
    if not TORCHVISION_AVAILABLE:
        raise RuntimeError(TORCHVISION_MISSING)
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(path)


def hf_model_from_dir(path: str | os.PathLike):
    """The HF model of a checkpoint directory, fp32, eval mode."""
    import torch
    from transformers import Qwen3OmniMoeForConditionalGeneration

    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(os.fspath(path), dtype=torch.float32)
    return model.eval()


def thinker_loss_case(seed: int, t: int, lengths, target_start: int):
    """A tiny HF thinker ("a"), the same weights in an omni_jax OmniModel, and a right-padded text batch with a
    loss mask from `target_start`; also runs transformers' thinker with labels and router logits.
    Returns (cfg, model, batch dict of jax arrays, numpy ids / valid / loss_mask, transformers output)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx

    from omni_jax.checkpoint.assign import load_tensors
    from omni_jax.models.omni import OmniModel

    cfg, hf = build_tiny_hf_model("a", enable_audio_output=False)
    model = OmniModel(cfg, rngs=nnx.Rngs(0), parts=("thinker",))
    load_tensors(model, {k: v.detach().numpy() for k, v in hf.state_dict().items()}, strict=False).raise_if_bad("hf")
    rng = np.random.default_rng(seed)
    b = len(lengths)
    ids = rng.integers(0, 490, (b, t)).astype(np.int32)
    valid = np.arange(t)[None] < np.asarray(lengths)[:, None]
    loss_mask = valid & (np.arange(t)[None] >= target_start)
    pos = np.broadcast_to(np.arange(t, dtype=np.float32)[None, None], (3, b, t)).copy()
    batch = jax.tree.map(jnp.asarray, dict(input_ids=ids, positions=pos, valid=valid, loss_mask=loss_mask))
    with torch.no_grad():
        out = hf.thinker(input_ids=torch.tensor(ids, dtype=torch.long),
                         attention_mask=torch.tensor(valid, dtype=torch.long),
                         labels=torch.tensor(np.where(loss_mask, ids, -100), dtype=torch.long),
                         output_router_logits=True)
    return cfg, model, batch, (ids, valid, loss_mask), out

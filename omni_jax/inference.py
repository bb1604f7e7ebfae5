"""From a model directory and a messages file to generated text: what `omni-jax generate` runs.

`OmniSession` loads the model once (HF directory or Orbax checkpoint), the tokenizer, chat template and
processor settings, and the generation defaults from generation_config.json; `generate()` turns a list of
messages into a prompt (placeholders expanded), runs the thinker and returns ids and text.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp

from omni_jax.checkpoint import hf as hf_io
from omni_jax.checkpoint import orbax_io
from omni_jax.generate import GenerationError, ThinkerGenerator, text_prompt_batch
from omni_jax.processing import chat
from omni_jax.processing.tokenizer import Tokenizer
from omni_jax.sampling import SamplingParams

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_model(path: str, *, dtype: str = "float32", parts=None):
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if orbax_io.is_orbax_dir(path):
        return orbax_io.load_orbax(path, dtype=DTYPES[dtype], parts=parts)
    return hf_io.load_hf(path, dtype=DTYPES[dtype], parts=parts)


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """generation_config.json values (those the thinker honours), with transformers' own defaults."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_new_tokens: int = 256
    eos_token_ids: tuple[int, ...] = ()

    @classmethod
    def from_dir(cls, path: str) -> GenerationDefaults:
        fn = os.path.join(path, "generation_config.json")
        if not os.path.exists(fn):
            return cls()
        with open(fn) as f:
            g = json.load(f)
        eos = g.get("eos_token_id")
        eos = () if eos is None else tuple(eos) if isinstance(eos, list) else (int(eos),)
        return cls(do_sample=bool(g.get("do_sample", False)), temperature=float(g.get("temperature") or 1.0),
                   top_k=int(g.get("top_k") if g.get("top_k") is not None else 50),
                   top_p=float(g.get("top_p") if g.get("top_p") is not None else 1.0),
                   repetition_penalty=float(g.get("repetition_penalty") or 1.0),
                   max_new_tokens=int(g.get("max_new_tokens") or 256), eos_token_ids=eos)


class OmniSession:
    def __init__(self, model_dir: str, *, dtype: str = "float32", parts=("thinker",)):
        self.model_dir = model_dir
        self.model, self.cfg = load_model(model_dir, dtype=dtype, parts=parts)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.defaults = GenerationDefaults.from_dir(model_dir)
        self.generator = ThinkerGenerator(self.model.thinker)

    def stop_ids(self) -> tuple[int, ...]:
        return tuple(dict.fromkeys((self.cfg.im_end_token_id, *self.defaults.eos_token_ids)))

    def sampling(self, *, greedy=None, temperature=None, top_k=None, top_p=None, seed=0,
                 repetition_penalty=None) -> SamplingParams:
        d = self.defaults
        do_sample = d.do_sample if greedy is None else not greedy
        if temperature is not None or top_k is not None or top_p is not None:
            do_sample = True if greedy is None else do_sample
        return SamplingParams(greedy=not do_sample, temperature=d.temperature if temperature is None else temperature,
                              top_k=d.top_k if top_k is None else top_k, top_p=d.top_p if top_p is None else top_p,
                              repetition_penalty=d.repetition_penalty if repetition_penalty is None
                              else repetition_penalty, seed=seed)

    def prompt_ids(self, messages) -> list[int]:
        kinds = [k for k in ("audio", "image", "video") if chat.media_parts(messages, k)]
        if kinds:
            raise chat.MessagesError(f"{', '.join(kinds)} input is not supported yet by this build (text only)")
        return chat.build_prompt(self.tokenizer, messages)

    def generate(self, messages, *, max_new_tokens=None, sampling: SamplingParams | None = None) -> dict:
        ids = self.prompt_ids(messages)
        max_new = max_new_tokens or self.defaults.max_new_tokens
        sampling = sampling or self.sampling()
        if not ids:
            raise GenerationError("the prompt is empty")
        res = self.generator.generate(text_prompt_batch([ids]), max_new_tokens=max_new, sampling=sampling,
                                      stop_ids=self.stop_ids())
        out = res.token_ids[0]
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        return {"prompt_token_ids": [int(i) for i in ids], "token_ids": [int(i) for i in out], "text": text}

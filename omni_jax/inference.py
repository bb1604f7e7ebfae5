"""From a model directory and a messages file to generated text: what `omni-jax generate` runs.

`OmniSession` loads the model once (HF directory or Orbax checkpoint), the tokenizer, chat template and
processor settings, and the generation defaults from generation_config.json; `generate()` turns a list of
messages into a prompt (placeholders expanded), runs the thinker and returns ids and text. With `speech=True` the
talker and code2wav are loaded too, and `speak()` / `stream_speech()` add the spoken reply (omni_jax.speech).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator

import jax.numpy as jnp
import numpy as np

from omni_jax.checkpoint import hf as hf_io
from omni_jax.checkpoint import orbax_io
from omni_jax.generate import GenerationError, PromptBatch, ThinkerGenerator, text_prompt_batch
from omni_jax.processing.tokenizer import Tokenizer
from omni_jax.prompt import ThinkerPrompt, prepare_thinker_prompt
from omni_jax.sampling import SamplingParams
from omni_jax.speech import SpeechError, SpeechGenerator, speaker_id

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load_model(path: str, *, dtype: str = "float32", parts=None, mesh=None, rules="default"):
    """(model, cfg); with a mesh every parameter is placed directly at its sharding as it is read."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}")
    if orbax_io.is_orbax_dir(path):
        return orbax_io.load_orbax(path, dtype=DTYPES[dtype], parts=parts, mesh=mesh, rules=rules)
    return hf_io.load_hf(path, dtype=DTYPES[dtype], parts=parts, mesh=mesh, rules=rules)


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

    def sampling(self, *, greedy=None, temperature=None, top_k=None, top_p=None, seed=0,
                 repetition_penalty=None) -> SamplingParams:
        """SamplingParams from these defaults and what is given (a warper given without greedy turns sampling
        on)."""
        do_sample = self.do_sample if greedy is None else not greedy
        if temperature is not None or top_k is not None or top_p is not None:
            do_sample = True if greedy is None else do_sample
        return SamplingParams(greedy=not do_sample, temperature=self.temperature if temperature is None else temperature,
                              top_k=self.top_k if top_k is None else top_k, top_p=self.top_p if top_p is None else top_p,
                              repetition_penalty=self.repetition_penalty if repetition_penalty is None
                              else repetition_penalty, seed=seed)


SPEECH_PARTS = ("thinker", "talker", "code2wav")


def speech_available(model_dir: str) -> bool:
    """Whether a checkpoint directory has speech output (talker + code2wav)."""
    try:
        check_speech_available(model_dir)
    except SpeechError:
        return False
    return os.path.exists(os.path.join(model_dir, "config.json")) or orbax_io.is_orbax_dir(model_dir)


def check_speech_available(model_dir: str) -> None:
    """Raise SpeechError unless the checkpoint has speech output (talker + code2wav), before loading weights."""
    from omni_jax.config import OmniConfig

    cfg_path = os.path.join(model_dir, "config.json")
    if not os.path.exists(cfg_path):
        return  # load_model reports the missing config
    if not OmniConfig.from_hf(cfg_path).enable_audio_output:
        raise SpeechError(f"{model_dir}: this checkpoint has no speech output (enable_audio_output is false: no "
                          f"talker / code2wav weights); drop --speak to get text only")
    if orbax_io.is_orbax_dir(model_dir):
        with open(os.path.join(model_dir, orbax_io.META)) as f:
            parts = json.load(f).get("parts", ())
        if not set(SPEECH_PARTS) <= set(parts):
            raise SpeechError(f"{model_dir}: this checkpoint has no speech output (it holds only {list(parts)})")


class OmniSession:
    """speech=True loads the talker and code2wav as well (only then can `speak` / `stream_speech` run).
    mesh: a mesh spec string ("data=2,expert=4", see omni_jax.sharding.make_mesh) or a Mesh: every loaded part
    (thinker, and with speech the talker and code2wav) is loaded at its shardings (`rules`: a preset name of
    omni_jax.sharding.RULE_PRESETS) and runs on that mesh."""

    def __init__(self, model_dir: str, *, dtype: str = "float32", parts=("thinker",), speech: bool = False,
                 mesh=None, rules: str = "default"):
        self.model_dir = model_dir
        if mesh is not None:
            from omni_jax import sharding

            mesh = sharding.make_mesh(mesh) if isinstance(mesh, str) else mesh
        self.mesh = mesh
        if speech:
            check_speech_available(model_dir)
            parts = SPEECH_PARTS
        self.model, self.cfg = load_model(model_dir, dtype=dtype, parts=parts, mesh=mesh, rules=rules)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.defaults = GenerationDefaults.from_dir(model_dir)
        self.generator = ThinkerGenerator(self.model.thinker, mesh=mesh, rules=rules)
        self.speech = (SpeechGenerator(self.cfg, self.model.thinker, self.model.talker, self.model.code2wav,
                                       mesh=mesh, rules=rules) if speech else None)

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

    def prompt(self, messages, *, use_audio_in_video: bool = False) -> ThinkerPrompt:
        return prepare_thinker_prompt(self.tokenizer, self.cfg, messages, use_audio_in_video=use_audio_in_video)

    def _run_thinker(self, messages, *, max_new_tokens=None, sampling: SamplingParams | None = None,
                     use_audio_in_video: bool = False, collect_hidden: tuple[int, ...] = ()):
        prompt = self.prompt(messages, use_audio_in_video=use_audio_in_video)
        ids = prompt.input_ids
        max_new = max_new_tokens or self.defaults.max_new_tokens
        sampling = sampling or self.sampling()
        if not ids:
            raise GenerationError("the prompt is empty")
        # Before any encoder runs: a long audio or video can make the prompt longer than the context.
        self.generator.check_context(len(ids), max_new, "prompt (after media placeholders)")
        if prompt.has_media:
            batch = self.generator.multimodal_batch(ids, prompt.positions, prompt.delta, audio=prompt.audio,
                                                    image=prompt.image, video=prompt.video)
        else:
            batch = text_prompt_batch([ids])
        res = self.generator.generate(batch, max_new_tokens=max_new, sampling=sampling, stop_ids=self.stop_ids(),
                                      collect_hidden=collect_hidden)
        return prompt, batch, res

    def generate(self, messages, *, max_new_tokens=None, sampling: SamplingParams | None = None,
                 use_audio_in_video: bool = False) -> dict:
        prompt, _, res = self._run_thinker(messages, max_new_tokens=max_new_tokens, sampling=sampling,
                                           use_audio_in_video=use_audio_in_video)
        return self._text_result(prompt.input_ids, res.token_ids[0])

    def _text_result(self, ids, out) -> dict:
        text = self.tokenizer.decode(out, skip_special_tokens=True)
        return {"prompt_token_ids": [int(i) for i in ids], "token_ids": [int(i) for i in out], "text": text}

    # -- speech ----------------------------------------------------------------------------------------------
    def _require_speech(self, speaker: str) -> SpeechGenerator:
        if self.speech is None:
            raise SpeechError("this session was opened without speech output (OmniSession(..., speech=True))")
        speaker_id(self.cfg, speaker)  # fail on an unknown speaker before running the thinker
        return self.speech

    def talker_prompt(self, messages, *, speaker: str = "Ethan", max_new_tokens=None,
                      sampling: SamplingParams | None = None):
        """Run the thinker and build the talker's prompt: (text result dict, omni_jax.speech.TalkerPrompt)."""
        speech = self._require_speech(speaker)
        k = self.cfg.talker_config.accept_hidden_layer
        prompt, batch, res = self._run_thinker(messages, max_new_tokens=max_new_tokens, sampling=sampling,
                                               collect_hidden=(0, k))
        n_prompt, padded = len(prompt.input_ids), batch.input_ids.shape[1]
        gen = res.token_ids[0]

        def rows(h):  # prompt rows (the prompt is bucket-padded to `padded`), then the fed-back generated tokens
            return np.concatenate([h[0, :n_prompt], h[0, padded:padded + len(gen) - 1]])

        tp = speech.talker_prompt(
            prompt.input_ids, gen, rows(res.hidden[0]), rows(res.hidden[k]), speaker=speaker,
            audio_seqlens=None if prompt.audio is None else [int(f) for f in prompt.audio[1]],
            image_grid=None if prompt.image is None else list(prompt.image[1]),
            video_grid=None if prompt.video is None else list(prompt.video[1]),
            second_per_grids=list(prompt.video_second_per_grid) or None)
        return self._text_result(prompt.input_ids, gen), tp

    def speak(self, messages, *, speaker: str = "Ethan", max_new_tokens=None, sampling: SamplingParams | None = None,
              talker_max_new_tokens: int = 4096, talker: SamplingParams | None = None) -> dict:
        """Text reply plus speech: the text result dict with "waveform" (float32 [N], 24 kHz, the reference's
        chunked decode), "codes" (int32 [G, T]) and "num_codec_frames". talker: talker sampling (default
        omni_jax.speech.talker_sampling(), i.e. transformers' defaults)."""
        out, tp = self.talker_prompt(messages, speaker=speaker, max_new_tokens=max_new_tokens, sampling=sampling)
        res = self.speech.generate_codes(tp, max_new_tokens=talker_max_new_tokens, sampling=talker)
        out.update(waveform=self.speech.waveform(res.codes), codes=res.codes, num_codec_frames=int(res.codes.shape[1]),
                   codec_finished=res.finished)
        return out

    def stream_speech(self, messages, *, speaker: str = "Ethan", max_new_tokens=None,
                      sampling: SamplingParams | None = None, talker_max_new_tokens: int = 4096,
                      talker: SamplingParams | None = None, group_frames: int = 4, left_context: int = 25,
                      state: dict | None = None) -> Iterator[np.ndarray]:
        """Yield float32 24 kHz waveform chunks while the talker runs (see SpeechGenerator.stream for what they
        concatenate to). The thinker runs to completion first. `state` receives "text" (the text result),
        "codec_tokens" and "finished"."""
        state = {} if state is None else state
        out, tp = self.talker_prompt(messages, speaker=speaker, max_new_tokens=max_new_tokens, sampling=sampling)
        state["text"] = out
        yield from self.speech.stream(tp, max_new_tokens=talker_max_new_tokens, sampling=talker,
                                      group_frames=group_frames, left_context=left_context, state=state)


    # -- a batch of requests -----------------------------------------------------------------------------------
    def _thinker_batch(self, prompts: list[ThinkerPrompt]) -> PromptBatch:
        """Several prompts as one right-padded thinker batch; with media in any row, every row's merged input
        embeddings (and DeepStack features, zero where a row has none) are built per row and stacked."""
        if not any(p.has_media for p in prompts):
            return text_prompt_batch([p.input_ids for p in prompts])
        rows = [self.generator.multimodal_batch(p.input_ids, p.positions, p.delta, audio=p.audio, image=p.image,
                                                video=p.video) for p in prompts]
        width = max(r.input_ids.shape[1] for r in rows)
        b, hidden = len(rows), rows[0].embeds.shape[-1]

        def pad(x, value=0):  # [..., P_i] along the last-but-feature / sequence axis -> width
            return np.pad(np.asarray(x), [(0, 0)] * (x.ndim - 1) + [(0, width - x.shape[-1])], constant_values=value)

        ids = np.concatenate([pad(r.input_ids) for r in rows])
        positions = np.concatenate([pad(np.asarray(r.positions, np.float32)) for r in rows], axis=1)
        embeds = np.zeros((b, width, hidden), np.asarray(rows[0].embeds).dtype)
        for i, r in enumerate(rows):
            embeds[i, :r.embeds.shape[1]] = np.asarray(r.embeds[0])
        layers = max((len(r.deepstack) for r in rows if r.deepstack is not None), default=0)
        deepstack = None
        if layers:
            deepstack = [np.zeros_like(embeds) for _ in range(layers)]
            for i, r in enumerate(rows):
                for k, feat in enumerate(r.deepstack or ()):
                    deepstack[k][i, :feat.shape[1]] = np.asarray(feat[0])
            deepstack = [jnp.asarray(d) for d in deepstack]
        return PromptBatch(ids, np.concatenate([r.lengths for r in rows]), positions,
                           np.concatenate([r.deltas for r in rows]), jnp.asarray(embeds), deepstack)

    def speak_batch(self, messages_list, *, speaker: str = "Ethan", max_new_tokens=None,
                    sampling: SamplingParams | None = None, talker_max_new_tokens: int = 4096,
                    talker: SamplingParams | None = None) -> list[dict]:
        """Speech for several conversations at once, with the semantics of transformers' batched
        `generate(..., return_audio=True)`: one thinker batch, one talker batch, each row stopping at its own EOS
        (see omni_jax.speech.SpeechGenerator.talker_prompts for the reference's per-row trailing-text quirk).
        Returns one `speak`-style dict per conversation ("waveform" float32 [N_i] cut at the row's codec EOS)."""
        speech = self._require_speech(speaker)
        if not messages_list:
            raise SpeechError("speak_batch needs at least one conversation")
        prompts = [self.prompt(m) for m in messages_list]
        max_new = max_new_tokens or self.defaults.max_new_tokens
        for i, p in enumerate(prompts):
            if not p.input_ids:
                raise GenerationError(f"prompt {i} is empty")
            self.generator.check_context(len(p.input_ids), max_new, f"prompt {i} (after media placeholders)")
        k = self.cfg.talker_config.accept_hidden_layer
        batch = self._thinker_batch(prompts)
        res = self.generator.generate(batch, max_new_tokens=max_new, sampling=sampling or self.sampling(),
                                      stop_ids=self.stop_ids(), collect_hidden=(0, k))
        steps, padded = max(len(t) for t in res.token_ids), batch.input_ids.shape[1]

        def rows(h, i):  # row i's prompt, then the generated tokens the batch fed back (an early EOS included)
            n, fed = len(prompts[i].input_ids), min(len(res.token_ids[i]), steps - 1)
            return np.concatenate([h[i, :n], h[i, padded:padded + fed]])

        media = [dict(audio_seqlens=None if p.audio is None else [int(f) for f in p.audio[1]],
                      image_grid=None if p.image is None else list(p.image[1]),
                      video_grid=None if p.video is None else list(p.video[1]),
                      second_per_grids=list(p.video_second_per_grid) or None) for p in prompts]
        tps = speech.talker_prompts([p.input_ids for p in prompts], res.token_ids,
                                    [rows(res.hidden[0], i) for i in range(len(prompts))],
                                    [rows(res.hidden[k], i) for i in range(len(prompts))], speaker=speaker,
                                    media=media)
        results = speech.generate_codes_batch(tps, max_new_tokens=talker_max_new_tokens, sampling=talker)
        wavs = speech.waveforms([r.codes for r in results])
        outs = []
        for p, toks, r, wav in zip(prompts, res.token_ids, results, wavs):
            out = self._text_result(p.input_ids, toks)
            out.update(waveform=wav, codes=r.codes, num_codec_frames=int(r.codes.shape[1]), codec_finished=r.finished,
                       codec_tokens=r.codec_tokens)
            outs.append(out)
        return outs

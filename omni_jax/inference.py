"""From a model directory and a messages file to generated text: what `omni-jax generate` runs.

`OmniSession` loads the model once (HF directory or Orbax checkpoint), the tokenizer, chat template and
processor settings, and the generation defaults from generation_config.json, into one serving engine
(omni_jax.serving.Engine, the same one `omni-jax serve` runs); `generate()` turns a list of messages into a
request and returns ids and text. With `speech=True` the talker and code2wav are loaded too, and `speak()` /
`stream_speech()` add the spoken reply.
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
from omni_jax.errors import OmniJaxError
from omni_jax.processing.tokenizer import Tokenizer
from omni_jax.prompt import ThinkerPrompt, prepare_thinker_prompt
from omni_jax.sampling import SamplingParams
from omni_jax.speech import SpeechError, speaker_id

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
        pick = lambda given, default: default if given is None else given  # noqa: E731
        return SamplingParams(greedy=not do_sample, temperature=pick(temperature, self.temperature),
                              top_k=pick(top_k, self.top_k), top_p=pick(top_p, self.top_p),
                              repetition_penalty=pick(repetition_penalty, self.repetition_penalty), seed=seed)


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
    """A blocking client of one serving engine (omni_jax.serving.Engine), built from a model directory.

    speech=True loads the talker and code2wav as well (only then can `speak` / `stream_speech` run).
    mesh: a mesh spec string ("data=2,expert=4", see omni_jax.sharding.make_mesh) or a Mesh: every loaded part
    (thinker, and with speech the talker and code2wav) is loaded at its shardings (`rules`: a preset name of
    omni_jax.sharding.RULE_PRESETS) and runs on that mesh. max_slots: requests decoded together (speak_batch
    runs up to that many at once). Steps compile on first use (`engine.warmup()` compiles them all)."""

    def __init__(self, model_dir: str, *, dtype: str = "float32", parts=("thinker",), speech: bool = False,
                 mesh=None, rules: str = "default", max_slots: int = 4, max_context: int | None = None, **engine_kw):
        from omni_jax.serving.scheduler import Engine

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
        self.engine = Engine(self.model, self.cfg, self.tokenizer, self.defaults,
                             model_name=os.path.basename(os.path.normpath(model_dir)), max_slots=max_slots,
                             max_context=max_context, speech=speech, mesh=mesh, rules=rules, **engine_kw)
        self.speech = self.engine.speech

    def stop_ids(self) -> tuple[int, ...]:
        return self.engine.stop_ids

    def sampling(self, **kw) -> SamplingParams:
        """SamplingParams from generation_config.json's defaults and the given greedy / temperature / top_k /
        top_p / seed / repetition_penalty."""
        return self.defaults.sampling(**kw)

    def prompt(self, messages, *, use_audio_in_video: bool = False) -> ThinkerPrompt:
        return prepare_thinker_prompt(self.tokenizer, self.cfg, messages, use_audio_in_video=use_audio_in_video)

    def request(self, messages, **kw):
        from omni_jax.serving.protocol import Request

        return Request(messages, **kw)

    def _run(self, requests) -> list[list]:
        """Submit requests (validated first, all before any runs) and return their events; an error event raises."""
        from omni_jax.serving.protocol import Finished

        handles = [self.engine.submit(r) for r in requests]
        out = self.engine.drive(handles)
        for r, events in zip(requests, out):
            fin = events[-1]
            if isinstance(fin, Finished) and fin.finish_reason == "error":
                raise (SpeechError if r.speech else OmniJaxError)(fin.error)
        return out

    def generate(self, messages, *, max_new_tokens=None, sampling: SamplingParams | None = None,
                 use_audio_in_video: bool = False) -> dict:
        fin = self._run([self.request(messages, max_new_tokens=max_new_tokens, sampling=sampling,
                                      use_audio_in_video=use_audio_in_video)])[0][-1]
        return self._text_result(fin)

    def stream(self, request):
        """Yield the engine's events (TextDelta, AudioChunk, Finished) of one Request as they come."""
        handle = self.engine.submit(request)
        if self.engine._thread is None:
            while not handle.done:
                self.engine.step()
                yield from _drain(handle)
            yield from _drain(handle)
        else:
            yield from handle.events()

    def _text_result(self, fin) -> dict:
        return {"prompt_token_ids": [int(i) for i in fin.prompt_ids], "token_ids": [int(i) for i in fin.token_ids],
                "text": self.tokenizer.decode(fin.token_ids, skip_special_tokens=True)}

    # -- speech ----------------------------------------------------------------------------------------------
    def _require_speech(self, speaker: str):
        if self.speech is None:
            raise SpeechError("this session was opened without speech output (OmniSession(..., speech=True))")
        speaker_id(self.cfg, speaker)  # fail on an unknown speaker before running the thinker
        return self.speech

    def _talker_inputs(self, fin, prompt: ThinkerPrompt):
        """(hidden_embed, hidden_accept) rows of a finished thinker run (return_hidden): the prompt's, then the
        fed-back generated tokens' input embeddings (the accept layer is only read at prompt rows: zeros)."""
        k = self.cfg.talker_config.accept_hidden_layer
        fed = self.engine.thinker.embed_tokens(np.asarray(fin.token_ids[:-1], np.int32))
        emb = np.concatenate([fin.hidden[0], fed])
        acc = np.concatenate([fin.hidden[k], np.zeros_like(fed)])
        return emb, acc

    @staticmethod
    def _media(p: ThinkerPrompt) -> dict:
        return dict(audio_seqlens=None if p.audio is None else [int(f) for f in p.audio[1]],
                    image_grid=None if p.image is None else list(p.image[1]),
                    video_grid=None if p.video is None else list(p.video[1]),
                    second_per_grids=list(p.video_second_per_grid) or None)

    def talker_prompt(self, messages, *, speaker: str = "Ethan", max_new_tokens=None,
                      sampling: SamplingParams | None = None):
        """Run the thinker and build the talker's prompt: (text result dict, omni_jax.speech.TalkerPrompt)."""
        speech = self._require_speech(speaker)
        prompt = self.prompt(messages)
        fin = self._run([self.request(messages, max_new_tokens=max_new_tokens, sampling=sampling,
                                      return_hidden=True)])[0][-1]
        emb, acc = self._talker_inputs(fin, prompt)
        tp = speech.talker_prompt(prompt.input_ids, fin.token_ids, emb, acc, speaker=speaker, **self._media(prompt))
        return self._text_result(fin), tp

    def _speech_request(self, messages, speaker, max_new_tokens, sampling, talker_max_new_tokens, talker,
                        stream_audio):
        from omni_jax.speech import talker_sampling

        return self.request(messages, max_new_tokens=max_new_tokens, sampling=sampling, speech=True,
                            speaker=speaker, talker_max_new_tokens=talker_max_new_tokens,
                            talker_sampling=talker or talker_sampling(), stream_audio=stream_audio)

    def speak(self, messages, *, speaker: str = "Ethan", max_new_tokens=None, sampling: SamplingParams | None = None,
              talker_max_new_tokens: int = 4096, talker: SamplingParams | None = None) -> dict:
        """Text reply plus speech: the text result dict with "waveform" (float32 [N], 24 kHz, the reference's
        chunked decode), "codes" (int32 [G, T]) and "num_codec_frames". talker: talker sampling (default
        omni_jax.speech.talker_sampling(), i.e. transformers' defaults)."""
        speech = self._require_speech(speaker)
        fin = self._run([self._speech_request(messages, speaker, max_new_tokens, sampling, talker_max_new_tokens,
                                              talker, False)])[0][-1]
        out = self._text_result(fin)
        out.update(waveform=speech.waveform(fin.codes), codes=fin.codes, num_codec_frames=int(fin.codes.shape[1]),
                   codec_finished=fin.codec_finished)
        return out

    def stream_speech(self, messages, *, speaker: str = "Ethan", max_new_tokens=None,
                      sampling: SamplingParams | None = None, talker_max_new_tokens: int = 4096,
                      talker: SamplingParams | None = None, state: dict | None = None) -> Iterator[np.ndarray]:
        """Yield float32 24 kHz waveform chunks as the engine's Code2Wav produces them (the talker starts while
        the thinker still runs; see omni_jax.serving.speech.WaveStream for what the chunks concatenate to).
        `state` receives "text" (the text result), "codec_tokens" and "finished" at the end."""
        from omni_jax.serving.protocol import AudioChunk, Finished

        self._require_speech(speaker)
        state = {} if state is None else state
        req = self._speech_request(messages, speaker, max_new_tokens, sampling, talker_max_new_tokens, talker, True)
        for ev in self.stream(req):
            if isinstance(ev, AudioChunk):
                yield ev.samples
            elif isinstance(ev, Finished):
                if ev.finish_reason == "error":
                    raise OmniJaxError(ev.error)
                state.update(text=self._text_result(ev), codec_tokens=ev.codec_tokens, finished=ev.codec_finished)

    # -- a batch of requests -----------------------------------------------------------------------------------
    def speak_batch(self, messages_list, *, speaker: str = "Ethan", max_new_tokens=None,
                    sampling: SamplingParams | None = None, talker_max_new_tokens: int = 4096,
                    talker: SamplingParams | None = None) -> list[dict]:
        """Speech for several conversations at once, with the semantics of transformers' batched
        `generate(..., return_audio=True)`: the thinker requests run together in the engine, then the talker
        prompts are built as the reference's batch builds them (see omni_jax.speech.SpeechGenerator.talker_prompts
        for its per-row trailing-text quirk) and run together in the engine's speech stage, each row stopping at
        its own EOS. Returns one `speak`-style dict per conversation ("waveform" float32 [N_i])."""
        speech = self._require_speech(speaker)
        if not messages_list:
            raise SpeechError("speak_batch needs at least one conversation")
        prompts = [self.prompt(m) for m in messages_list]
        fins = [ev[-1] for ev in self._run([self.request(m, max_new_tokens=max_new_tokens, sampling=sampling,
                                                         return_hidden=True) for m in messages_list])]
        steps = max(len(f.token_ids) for f in fins)
        rows = []
        for p, f in zip(prompts, fins):
            emb, acc = self._talker_inputs(f, p)
            fed = min(len(f.token_ids), steps - 1)  # the batch fed back a row's early EOS too
            if fed == len(f.token_ids):
                extra = self.engine.thinker.embed_tokens(np.asarray(f.token_ids[-1:], np.int32))
                emb, acc = np.concatenate([emb, extra]), np.concatenate([acc, np.zeros_like(extra)])
            rows.append((emb, acc))
        tps = speech.talker_prompts([p.input_ids for p in prompts], [f.token_ids for f in fins],
                                    [r[0] for r in rows], [r[1] for r in rows], speaker=speaker,
                                    media=[self._media(p) for p in prompts])
        results = speech.generate_codes_batch(tps, max_new_tokens=talker_max_new_tokens, sampling=talker)
        wavs = speech.waveforms([r.codes for r in results])
        outs = []
        for f, r, wav in zip(fins, results, wavs):
            out = self._text_result(f)
            out.update(waveform=wav, codes=r.codes, num_codec_frames=int(r.codes.shape[1]), codec_finished=r.finished,
                       codec_tokens=r.codec_tokens)
            outs.append(out)
        return outs


def _drain(handle):
    import queue

    while True:
        try:
            yield handle.get(timeout=0)
        except queue.Empty:
            return


"""Speech output: thinker run -> talker prompt -> talker + code predictor decode -> Code2Wav waveform (24 kHz).

Reference: spec §6.2 (talker prompt), §6.3 (decode loop), §7.6 (chunked decode), §8.1; pitfalls P11-P15, P17.

- `SpeechGenerator.talker_prompt` builds the talker's input rows from the thinker's `hidden_states[0]` (input
  embeddings) and `hidden_states[accept_hidden_layer]`, exactly as `Qwen3OmniMoeForConditionalGeneration.generate`:
  user turns (hidden_projection at audio/image/video rows, text_projection elsewhere; system and assistant turns
  dropped), then 9 assistant rows (text track + codec track), plus the trailing text rows fed one per step.
- The talker's decode loop (prefill, then per frame: code predictor for codebooks 1..G-1, next input = sum of
  the G codebook embeddings + one trailing text row, talker step, sampling of the next codebook-0 code) runs in
  the serving engine's speech stage (omni_jax/serving/speech.py), over slots and in chunks of frames.
  `max_new_tokens` means what transformers' `talker_max_new_tokens` means: at most that many codebook-0 codes
  are sampled (the prefill samples the first); a frame is emitted for every sampled code except codec EOS and
  except the last one sampled when the budget runs out. So without EOS, N tokens give N-1 frames.
- `SpeechGenerator.waveform`: the reference's offline decode (`chunked_decode`, chunk 300, left context 25).

Batches (`talker_prompts`, `waveforms`) follow the reference's batched `generate`: the assistant part is located
with row 0 (all rows end at the same column under its left padding), each row's trailing text rows get the
per-row EOS re-marking (§6.2; a row whose thinker stopped before the longest one sees its EOS projection, then
tts_eos, then tts_pad), each row stops at its own codec EOS, and each row's waveform is cut at its own length.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from omni_jax import sharding as S
from omni_jax.config import OmniConfig
from omni_jax.errors import OmniJaxError
from omni_jax.generate import bucket
from omni_jax.positions import get_rope_index
from omni_jax.sampling import SamplingParams

SAMPLE_RATE = 24_000  # Code2Wav output rate (1920 samples per 12.5 Hz codec frame)
# The code predictor's warpers when the talker samples (HF passes top_k=50, top_p=0.8; temperature stays at the
# generation-config default 1.0). Greedy talker -> greedy code predictor.
CP_TOP_K, CP_TOP_P, CP_TEMPERATURE = 50, 0.8, 1.0
TEXT_ROWS = 9  # rows of the assistant prefix


class SpeechError(OmniJaxError):
    """A speech request that cannot be served (no talker, unknown speaker, unusable thinker output, ...)."""


def talker_sampling(*, greedy: bool = False, temperature: float = 0.9, top_k: int | None = 50,
                    top_p: float | None = 1.0, repetition_penalty: float = 1.05, seed: int = 0) -> SamplingParams:
    """The talker's sampling, with the defaults of transformers' `generate` (talker_do_sample=True, ...)."""
    return SamplingParams(greedy=greedy, temperature=temperature, top_k=top_k, top_p=top_p,
                          repetition_penalty=repetition_penalty, seed=seed)


def speaker_id(cfg: OmniConfig, speaker: str) -> int:
    """Codec id of a speaker name (case-insensitive, as the reference's `speaker.lower()`)."""
    speakers = cfg.talker_config.speakers
    sid = speakers.get(str(speaker).lower())
    if sid is None:
        known = ", ".join(sorted(speakers)) or "(none)"
        raise SpeechError(f"unknown speaker {speaker!r}; this checkpoint knows: {known}")
    return sid


def user_positions(ids: np.ndarray, cfg: OmniConfig) -> np.ndarray:
    """Indices of prompt tokens in user turns: those whose role token (the one right after the most recent
    `<|im_start|>`; position 1 before any) is `user`, as the reference's cummax rule. ids int [L] -> int [U]."""
    n = ids.shape[0]
    pos = np.arange(n)
    prev = np.maximum.accumulate(np.where(ids == cfg.im_start_token_id, pos, -1)).clip(min=0)
    role = ids[np.minimum(prev + 1, n - 1)]
    return pos[role == cfg.user_token_id]


def assistant_start(ids: np.ndarray, cfg: OmniConfig) -> int:
    """Index of the last `<|im_start|>` followed by `assistant` (the reference reads row 0 only)."""
    hits = np.nonzero((ids[:-1] == cfg.im_start_token_id) & (ids[1:] == cfg.assistant_token_id))[0]
    if hits.size == 0:
        raise SpeechError("speech output needs a prompt that ends with the assistant generation prompt "
                          "(<|im_start|>assistant); none found")
    return int(hits[-1])


# -- jitted pure functions: module level with the graphdef static, so every session of one architecture shares
# the compiled code ---------------------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=(0,))
def _project(graphdef, state, embeds, hidden):
    """embeds, hidden float [R, thinker_H] -> (text_projection(embeds), hidden_projection(hidden)) [R, H]."""
    talker = nnx.merge(graphdef, state)
    with jax.named_scope("talker_projections"):
        return talker.text_projection(embeds), talker.hidden_projection(hidden)


@functools.partial(jax.jit, static_argnums=(0,))
def _embed_codes(graphdef, state, ids):
    """talker.model.codec_embedding of int ids [...] -> [..., H]."""
    return nnx.merge(graphdef, state).embed_codes(ids)


@functools.partial(jax.jit, static_argnums=(0,))
def _code2wav(graphdef, state, codes):
    """Code2Wav: int [B, G, T] -> [B, 1, 1920 T - 555]."""
    return nnx.merge(graphdef, state)(codes)


@dataclasses.dataclass
class TalkerPrompt:
    """The talker's input for one request (or one row of a batch: `SpeechGenerator.talker_prompts`).

    embeds float [L, H]: user rows, then the 9 assistant rows (= assistant_text + assistant_codec);
    ids int [L]: thinker ids of the user rows then tts_pad (used for positions only); positions float32 [3, L];
    trailing float [N, H]: text rows fed one per decode step (generated tokens g1.., then tts_eos; in a batch, N is
    the batch's length and a row that stopped early ends with its EOS projection, tts_eos, then tts_pad);
    tts_pad float [H]: the text row once `trailing` is used up.
    """

    embeds: np.ndarray
    ids: np.ndarray
    positions: np.ndarray
    trailing: np.ndarray
    tts_pad: np.ndarray
    num_user_rows: int
    assistant_text: np.ndarray
    assistant_codec: np.ndarray
    trailing_ids: np.ndarray | None = None  # int [N]: the thinker id behind each trailing row (tts_eos / tts_pad)


@dataclasses.dataclass
class SpeechResult:
    codes: np.ndarray  # int32 [G, T] codec frames
    codec_tokens: list[int]  # every sampled codebook-0 code, including a final EOS or the unexpanded last one
    finished: bool  # True when the talker sampled codec EOS
    waveform: np.ndarray | None = None  # float32 [N] at SAMPLE_RATE


class SpeechGenerator:
    """Holds the compiled talker / code2wav functions of one model; reuse it across requests.

    thinker: used only for the input embeddings of tts_bos / tts_eos / tts_pad; talker, code2wav: the modules.
    mesh / rules: as the engine's: the talker and code2wav parameters sit at their rule shardings and every
    compiled call runs under the mesh (the talker's MoE layers dispatch experts over the `expert` axis).
    """

    def __init__(self, cfg: OmniConfig, thinker, talker, code2wav, *, moe_impl: str = "auto", mesh=None,
                 rules: str | S.Rules = "default"):
        if talker is None or code2wav is None:
            raise SpeechError("this model was loaded without its talker / code2wav (speech output not loaded)")
        self.cfg = cfg
        self.tcfg = cfg.talker_config
        self.moe_impl = moe_impl
        self.mesh, self.rules = mesh, S.get_rules(rules)
        self.graphdef, self.state = nnx.split(talker)
        self.dtype = jax.tree.leaves(self.state)[0].dtype
        self.code2wav = code2wav
        self._c2w_graphdef, self._c2w_state = nnx.split(code2wav)
        if mesh is not None:  # a no-op for parameters loaded at their shardings (load_model(..., mesh=))
            S.check_model_fits(mesh, [("talker", self.tcfg.text_config)])
            self.state = jax.device_put(self.state, S.named_shardings(self.state, mesh, self.rules))
            self._c2w_state = jax.device_put(self._c2w_state, S.named_shardings(self._c2w_state, mesh, self.rules))
        self.total_upsample = code2wav.total_upsample
        self.tail_loss = self.total_upsample - code2wav.output_length(1)  # samples a decode lacks at its end
        vocab = self.tcfg.text_config.vocab_size
        eos = self.tcfg.codec_eos_token_id
        suppress = np.zeros(vocab, bool)
        suppress[max(vocab - 1024, 0):] = True  # the reference's suppress_tokens: [vocab-1024, vocab) except EOS
        suppress[eos] = False
        self.suppress = jnp.asarray(suppress)
        tts_ids = jnp.asarray([cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id])
        with self._on_mesh():
            tts_text, _ = _project(self.graphdef, self.state, thinker.embed(tts_ids).astype(self.dtype),
                                   jnp.zeros((3, self.tcfg.thinker_hidden_size), self.dtype))
        self.tts_bos, self.tts_eos, self.tts_pad = np.asarray(tts_text)

    def _on_mesh(self):
        """Context for every compiled call: the mesh and rules (nothing without a mesh)."""
        return S.on_mesh(self.mesh, self.rules)

    # -- talker prompt (§6.2) ---------------------------------------------------------------------------------
    def _codec_rows(self, ids) -> np.ndarray:
        """talker.model.codec_embedding rows of int ids [K] -> [K, H]."""
        with self._on_mesh():
            return np.asarray(_embed_codes(self.graphdef, self.state, np.asarray(ids, np.int32)))

    def project_rows(self, hidden_embed: np.ndarray, hidden_accept: np.ndarray, piece: int = 64):
        """(text_projection(hidden_embed), hidden_projection(hidden_accept)) of float [R, thinker_H] rows, in pieces
        of `piece` rows (one compiled shape for every prompt length) -> two float [R, H]."""
        rows = hidden_embed.shape[0]
        padded = -(-max(rows, 1) // piece) * piece
        pad = ((0, padded - rows), (0, 0))
        e, a = np.pad(np.asarray(hidden_embed), pad), np.pad(np.asarray(hidden_accept), pad)
        text, mm = [], []
        with self._on_mesh():
            for i in range(0, padded, piece):
                t, m = _project(self.graphdef, self.state, jnp.asarray(e[i:i + piece], self.dtype),
                                jnp.asarray(a[i:i + piece], self.dtype))
                text.append(np.asarray(t))
                mm.append(np.asarray(m))
        return np.concatenate(text)[:rows], np.concatenate(mm)[:rows]

    def talker_prompt(self, prompt_ids, generated_ids, hidden_embed: np.ndarray, hidden_accept: np.ndarray, *,
                      speaker: str = "Ethan", audio_seqlens=None, image_grid=None, video_grid=None,
                      second_per_grids=None) -> TalkerPrompt:
        """Talker input from one thinker run.

        prompt_ids: the L prompt ids (placeholders expanded); generated_ids: the n generated ids (with the stop id
        if produced); hidden_embed, hidden_accept float [L + n - 1, thinker_H]: the reference's `hidden_states[0]`
        and `hidden_states[accept_hidden_layer]` for the prompt followed by every fed-back generated token (the
        last generated token is never fed back). audio_seqlens (mel frames per audio), image_grid / video_grid
        ((t, h, w), ...), second_per_grids: the prompt's media, for the talker's TM-RoPE positions.
        """
        ids = np.asarray(prompt_ids, np.int64)
        gen = np.asarray(generated_ids, np.int64)
        if ids.ndim != 1 or gen.ndim != 1 or np.ndim(hidden_embed) != 2 or np.ndim(hidden_accept) != 2:
            raise SpeechError("talker_prompt serves one request (batch size 1): pass 1-D prompt / generated ids and "
                              "[rows, hidden] thinker states (talker_prompts builds a batch)")
        n_prompt, n_gen = ids.shape[0], gen.shape[0]
        rows = n_prompt + n_gen - 1
        self._check_rows(hidden_embed, hidden_accept, rows, f"the {n_prompt} prompt tokens and {n_gen - 1} fed-back "
                                                             f"generated tokens")
        spk = speaker_id(self.cfg, speaker)
        a_start = assistant_start(ids, self.cfg)
        if rows - a_start < 4:
            raise SpeechError(f"speech output needs at least 2 generated thinker tokens (the assistant prefix uses "
                              f"the first one and the talker is fed the rest); the thinker produced {n_gen}")
        # One request: the thinker stops at its first EOS, the last generated token, which is never fed back; so
        # the reference's per-row EOS re-marking of trailing rows changes nothing (first_eos=None).
        media = dict(audio_seqlens=audio_seqlens, image_grid=image_grid, video_grid=video_grid,
                     second_per_grids=second_per_grids)
        return self._row_prompt(ids, np.asarray(hidden_embed), np.asarray(hidden_accept), a_start=a_start,
                                trailing_len=rows - a_start - 3, first_eos=None, spk=spk, media=media, gen_ids=gen)

    def talker_prompts(self, prompt_ids, generated_ids, hidden_embed, hidden_accept, *, speaker: str = "Ethan",
                       media=None) -> list[TalkerPrompt]:
        """Talker inputs of a batch of requests whose thinker ran as one batch, as the reference's batched
        `generate` builds them (its rows left-padded to one length, so every prompt ends at the same column).

        prompt_ids, generated_ids: per row, the L_i prompt ids and the n_i generated ids. The batch ran
        N = max(n_i) thinker steps; a row with n_i < N stopped at its first EOS (its last token) and, as in the
        reference, that EOS was still fed back. hidden_embed / hidden_accept: per row float [L_i + f_i, thinker_H]
        with f_i = min(n_i, N - 1): the reference's `hidden_states[0]` / `[accept_hidden_layer]` rows of the
        prompt and the row's fed-back generated tokens. media: per row None or a dict with the keys
        audio_seqlens / image_grid / video_grid / second_per_grids of `talker_prompt`.

        As the reference: the assistant part starts, in every row, at the offset from the prompt end of row 0's
        last `<|im_start|>assistant`; every row's trailing text has the batch length (N - 1 for prompts ending
        with the generation prompt), and a row whose first EOS is generated token e gets tts_eos at entry e and
        tts_pad after it (so it sees its EOS projection at entry e - 1; the longest rows do not).
        """
        cfg = self.cfg
        b = len(prompt_ids)
        if not (b == len(generated_ids) == len(hidden_embed) == len(hidden_accept)) or b == 0:
            raise SpeechError(f"talker_prompts needs one prompt, generated ids and hidden states per row; got "
                              f"{len(prompt_ids)}, {len(generated_ids)}, {len(hidden_embed)}, {len(hidden_accept)}")
        media = [None] * b if media is None else list(media)
        if len(media) != b:
            raise SpeechError(f"talker_prompts: media has {len(media)} entries for {b} rows")
        ids = [np.asarray(p, np.int64).reshape(-1) for p in prompt_ids]
        gens = [np.asarray(g, np.int64).reshape(-1) for g in generated_ids]
        if any(p.size == 0 for p in ids) or any(g.size == 0 for g in gens):
            raise SpeechError("talker_prompts: every row needs a prompt and at least one generated token")
        spk = speaker_id(cfg, speaker)
        steps = max(g.size for g in gens)
        offset = ids[0].size - assistant_start(ids[0], cfg)  # row 0 locates the assistant part for every row
        trailing_len = offset + steps - 4  # the reference's A[4:] over the batch length, then tts_eos
        if trailing_len < 1:
            raise SpeechError(f"speech output needs at least 2 generated thinker tokens (the assistant prefix uses "
                              f"the first one and the talker is fed the rest); the longest row has {steps}")
        out = []
        for i in range(b):
            fed = min(gens[i].size, steps - 1)
            self._check_rows(hidden_embed[i], hidden_accept[i], ids[i].size + fed,
                             f"row {i}: its {ids[i].size} prompt tokens and {fed} fed-back generated tokens")
            a_start = ids[i].size - offset
            if a_start < 0:
                raise SpeechError(f"row {i}: its prompt ({ids[i].size} tokens) is shorter than the assistant part "
                                  f"located in row 0 ({offset} tokens before the end); every row must end with the "
                                  f"assistant generation prompt")
            first_eos = gens[i].size - 1 if gens[i].size < steps else None
            out.append(self._row_prompt(ids[i], np.asarray(hidden_embed[i]), np.asarray(hidden_accept[i]),
                                        a_start=a_start, trailing_len=trailing_len, first_eos=first_eos, spk=spk,
                                        media=media[i] or {}, row=i, gen_ids=gens[i]))
        return out

    @staticmethod
    def _check_rows(hidden_embed, hidden_accept, rows: int, what: str):
        if np.ndim(hidden_embed) != 2 or np.ndim(hidden_accept) != 2:
            raise SpeechError(f"thinker hidden states must be [rows, hidden]; got shapes {np.shape(hidden_embed)} "
                              f"and {np.shape(hidden_accept)}")
        if np.shape(hidden_embed)[0] != rows or np.shape(hidden_accept)[0] != rows:
            raise SpeechError(f"thinker hidden states must cover {what} ({rows} rows); got "
                              f"{np.shape(hidden_embed)[0]} and {np.shape(hidden_accept)[0]}")

    def _row_prompt(self, ids: np.ndarray, hidden_embed: np.ndarray, hidden_accept: np.ndarray, *, a_start: int,
                    trailing_len: int, first_eos: int | None, spk: int, media: dict, row: int = 0,
                    gen_ids=None) -> TalkerPrompt:
        """One row's talker input. hidden_* [R, thinker_H]: the prompt, then the fed-back generated tokens.
        trailing_len: entries of the trailing text (the reference's batch-wide length); first_eos: index of the
        row's first generated EOS when the row stopped before the batch did (None otherwise)."""
        cfg, tcfg = self.cfg, self.tcfg
        users = user_positions(ids, cfg)

        text_rows, mm_rows = self.project_rows(hidden_embed, hidden_accept)

        th = cfg.thinker_config
        multimodal = np.isin(ids, [th.audio_token_id, th.image_token_id, th.video_token_id])
        user_rows = np.where(multimodal[users, None], mm_rows[users], text_rows[users])

        a = text_rows[a_start:]  # im_start, "assistant", "\n", g0, g1, ... (fed-back generated tokens only)
        if a.shape[0] < 4:
            raise SpeechError(f"row {row}: the assistant part has {a.shape[0]} rows; the talker prompt needs 4 (the "
                              f"assistant prefix and the first generated token)")
        assistant_text = np.concatenate([a[:3], np.repeat(self.tts_pad[None], 4, 0), self.tts_bos[None], a[3:4]])
        codec_ids = [tcfg.codec_nothink_id, tcfg.codec_think_bos_id, tcfg.codec_think_eos_id, spk,
                     tcfg.codec_pad_id, tcfg.codec_bos_id]
        assistant_codec = np.concatenate([np.zeros((3, a.shape[1]), a.dtype), self._codec_rows(codec_ids)])

        # Trailing text: the reference's A[4 : 4 + trailing_len - 1] then tts_eos; for a row that stopped early,
        # entry first_eos becomes tts_eos and later entries tts_pad (§6.2).
        j = np.arange(trailing_len)
        eos_at = trailing_len - 1 if first_eos is None else min(first_eos, trailing_len - 1)
        real = j < eos_at  # entries that keep a projected thinker row
        if 4 + int(real.sum()) > a.shape[0]:
            raise SpeechError(f"row {row}: the reference would feed the talker thinker rows past this row's EOS "
                              f"(an assistant prefix shorter than '<|im_start|>assistant\\n'); not supported")
        trailing = np.where((j > eos_at)[:, None], self.tts_pad[None], self.tts_eos[None]).astype(a.dtype)
        trailing[real] = a[4:4 + int(real.sum())]
        trailing_ids = None
        if gen_ids is not None:  # the same entries as thinker ids (the serving engine projects them itself)
            a_ids = np.concatenate([ids[a_start:], np.asarray(gen_ids, np.int64)])
            trailing_ids = np.where(j > eos_at, cfg.tts_pad_token_id, cfg.tts_eos_token_id)
            trailing_ids[real] = a_ids[4:4 + int(real.sum())]

        talker_ids = np.concatenate([ids[users], np.full(TEXT_ROWS, cfg.tts_pad_token_id, np.int64)])
        embeds = np.concatenate([user_rows, assistant_text + assistant_codec])
        positions = self._positions(talker_ids, media.get("audio_seqlens"), media.get("image_grid"),
                                    media.get("video_grid"), media.get("second_per_grids"))
        return TalkerPrompt(embeds, talker_ids, positions, trailing, self.tts_pad, int(users.size), assistant_text,
                            assistant_codec, trailing_ids)

    def _positions(self, talker_ids, audio_seqlens, image_grid, video_grid, second_per_grids) -> np.ndarray:
        """[3, L] float32. With media in the request, TM-RoPE over the talker ids with the talker config's token
        ids, merge size and position_id_per_seconds; the audio window comes from the thinker's audio config (the
        reference's talker config lacks it, P13a: this is what it computes with the `audio_config` workaround).
        Otherwise plain positions 0..L-1 on all axes."""
        n = talker_ids.shape[0]
        has_media = audio_seqlens is not None or bool(image_grid) or bool(video_grid)
        if not has_media:
            return np.broadcast_to(np.arange(n, dtype=np.float32)[None], (3, n)).copy()
        t = self.tcfg
        pos, _ = get_rope_index(
            talker_ids[None], None, image_grid_thw=image_grid or None, video_grid_thw=video_grid or None,
            second_per_grids=second_per_grids or None, audio_seqlens=audio_seqlens, use_audio_in_video=False,
            spatial_merge_size=t.spatial_merge_size, position_id_per_seconds=t.position_id_per_seconds,
            image_token_id=t.image_token_id, video_token_id=t.video_token_id, audio_token_id=t.audio_token_id,
            vision_start_token_id=t.vision_start_token_id, audio_start_token_id=t.audio_start_token_id,
            n_window=self.cfg.thinker_config.audio_config.n_window, dtype=np.float32)
        return pos[:, 0]

    # -- waveform (§7.6) ----------------------------------------------------------------------------------------
    def decode_batch(self, codes: np.ndarray) -> np.ndarray:
        """Code2Wav of int [B, G, T] codes -> float32 [B, 1920*T - 555]. Runs at a bucketed frame count (codes
        padded on the right with 0): Code2Wav is causal, so the first 1920*T - 555 samples do not depend on the
        padding."""
        codes = np.asarray(codes, np.int32)
        self.code2wav.validate_codes(codes)
        t = codes.shape[-1]
        padded = np.pad(codes, ((0, 0), (0, 0), (0, bucket(t, 8) - t)))
        with self._on_mesh():
            wav = _code2wav(self._c2w_graphdef, self._c2w_state, jnp.asarray(padded))
        return np.asarray(wav[:, 0, :t * self.total_upsample - self.tail_loss], np.float32)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """Code2Wav of int [G, T] codes -> float32 [1920*T - 555] (see decode_batch)."""
        return self.decode_batch(np.asarray(codes, np.int32)[None])[0]

    def waveform(self, codes: np.ndarray, chunk_size: int = 300, left_context_size: int = 25) -> np.ndarray:
        """The reference's offline result: `chunked_decode(codes, 300, 25)` of int [G, T] -> float32 [N]."""
        codes = np.asarray(codes, np.int32)
        if codes.shape[-1] == 0:
            return np.zeros(0, np.float32)
        self.code2wav.validate_codes(codes[None])
        wav = self.code2wav.chunked_decode(codes[None], chunk_size, left_context_size,
                                           decode_fn=lambda c: self.decode(np.asarray(c)[0])[None, None])
        return np.asarray(wav[0, 0], np.float32)

    def waveforms(self, codes: list[np.ndarray], chunk_size: int = 300, left_context_size: int = 25
                  ) -> list[np.ndarray]:
        """Per-row waveforms of a batch, as the reference's batched `generate` makes them: the rows' int [G, T_i]
        codes right-padded with 0 to the longest, one chunked decode of the batch, row i cut to
        1920 T_i - 555 ceil(T_i / chunk_size) samples. Equal to `waveform` of each row alone (Code2Wav is causal
        and the chunk boundaries coincide). Rows without frames give empty waveforms."""
        rows = [np.asarray(c, np.int32) for c in codes]
        t = max((c.shape[-1] for c in rows), default=0)
        if t == 0:
            return [np.zeros(0, np.float32) for _ in rows]
        batch = np.stack([np.pad(c, ((0, 0), (0, t - c.shape[-1]))) for c in rows])
        wav = self.code2wav.chunked_decode(batch, chunk_size, left_context_size,
                                           decode_fn=lambda c: self.decode_batch(np.asarray(c))[:, None])
        wav = np.asarray(wav[:, 0], np.float32)
        lengths = [c.shape[-1] * self.total_upsample - self.tail_loss * -(-c.shape[-1] // chunk_size) for c in rows]
        return [w[:n] for w, n in zip(wav, lengths)]

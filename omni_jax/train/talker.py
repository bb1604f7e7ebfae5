"""Talker training: codebook-0 cross-entropy on the talker's codec_head plus the code predictor's ("MTP")
cross-entropy over the residual codebooks 1..Q-1, teacher-forced on given codec frames.

Sequence layout (one example; the inference prompt of `omni_jax.speech.SpeechGenerator.talker_prompt` followed
by the teacher-forced decode inputs, for a thinker answer of m reply tokens g0..g_{m-1} then <|im_end|>):

  rows [0, U)        user-turn rows: text_projection(thinker embedding), hidden_projection(thinker layer
                     `accept_hidden_layer`) at audio/image/video placeholders;
  rows [U, L=U+9)    the 9 assistant rows (text track + codec track: nothink, think_bos, think_eos, speaker,
                     codec_pad, codec_bos);
  rows [L, L+F)      frame f: the sum of its Q codebook embeddings (talker codec_embedding for codebook 0, the
                     code predictor's tables for 1..Q-1) + trailing text row f (g1.., tts_eos, then tts_pad);
  row  L+F           codec_embedding(codec_eos) + trailing text row F (the EOS row: only carries the label).

Input convention (what `talker_loss` reads; the same as transformers' forward signatures):
  - Talker: `Qwen3OmniMoeTalkerForConditionalGeneration.forward(inputs_embeds=E, labels=Y, position_ids=P,
    attention_mask=V)` with E the rows above (`talker_inputs`), Y = `talker_labels` (codebook-0 id of the codec
    input at frame rows, codec_eos at the EOS row, -100 elsewhere): HF's causal shift makes the logits at row
    L-1+f predict frame f's codebook 0 and those at the last frame row predict codec_eos. talker_ce is that
    loss (mean over target rows); the talker's load-balancing loss (HF `output_router_logits=True`) is added
    with `aux_loss_coef`. (transformers 5.23's talker forward with labels reads `config.vocab_size`, which only
    its text_config has: the parity test sets it.)
  - Code predictor, per frame: rows [h, E_talker(c0), E_cp[0](c1), ..., E_cp[Q-3](c_{Q-2})] where h is the
    talker's final-normed hidden state at row L-1+f (the row whose logits gave c0), as in generate. Row q
    (q = 1..Q-1) predicts codebook q with lm_head[q-1]. transformers' code predictor picks ONE head per call
    from the input length (lm_head[len-2]), so its forward(labels=...) reproduces codebook q only on the first
    q+1 rows with the target on the last row, i.e. `shift_labels` = [-100]*q + [c_q]. Causal attention makes
    row q of one Q-row forward equal to that call, so one forward gives all Q-1 heads. mtp_ce is the mean over
    valid frames and codebooks (= the mean of the Q-1 per-codebook HF losses).
  Gradients reach the talker through h as well (joint talker + code-predictor training).

Batch fields (added to the thinker batch of `train.data`, which supplies the thinker rows; T = thinker length,
T2 = talker rows, F = frames):
  talker_text_src int32 [B, T2]   text-track source: thinker row t < T, T/T+1/T+2 = tts_bos/tts_eos/tts_pad, -1 none
  talker_text_mm bool [B, T2]     hidden_projection of the accept-layer row (multimodal user rows)
  talker_codec_ids int32 [B, T2]  codec id whose talker embedding forms the codec track (-1: none or a frame row)
  talker_positions float32 [B, 3, T2] (example-major as batched; moved to [3, B, T2] in-graph)
  talker_valid bool [B, T2], talker_labels int32 [B, T2] (-100: no target)
  codec_codes int32 [B, F, Q], codec_valid bool [B, F], frame_start int32 [B] (= L)
Records carry the frames as `"codec_codes": [[c0, ..., c_{Q-1}], ...]` (and optionally `"speaker"`).
"""

from __future__ import annotations

import dataclasses
import json
import types

import jax
import jax.numpy as jnp
import numpy as np

from omni_jax.config import OmniConfig
from omni_jax.errors import OmniJaxError
from omni_jax.speech import SpeechError, SpeechGenerator, assistant_start, speaker_id, user_positions
from omni_jax.train import data as D
from omni_jax.train import step as TS

IGNORE = -100  # transformers' ignore_index
ASSISTANT_ROWS = 9
# The talker fields a batch adds to the thinker's (`talker_layout`), each with the dim that indexes examples as
# the array reaches the device: all are example-major (talker_positions stays [B, 3, T2] until `talker_loss`
# moves it in-graph). The trainer splits that dim over the mesh's batch axes.
BATCH_DIMS = {"talker_text_src": 0, "talker_text_mm": 0, "talker_codec_ids": 0, "talker_positions": 0,
              "talker_valid": 0, "talker_labels": 0, "codec_codes": 0, "codec_valid": 0, "frame_start": 0}


class TalkerTrainError(OmniJaxError):
    """A talker-training setup that cannot work (no talker in the model, bad talker config, ...)."""


@dataclasses.dataclass(frozen=True)
class TalkerTrainConfig:
    """The `talker` config section: static shapes, the speaker, loss weights."""

    seq_len: int = 128  # talker rows per example (user rows + 9 + frames + 1)
    max_frames: int = 64  # codec frames per example
    speaker: str = "ethan"  # default speaker (a record's "speaker" overrides it)
    mtp_weight: float = 1.0  # weight of the code-predictor CE
    aux_loss_coef: float | None = None  # talker load-balancing loss; None: talker text config's router coef


# ------------------------------------------------------------------------------------------- host-side layout


def _talker_positions(cfg: OmniConfig, talker_ids, audio_seqlens, image_grid) -> np.ndarray:
    """[3, L] positions of the prompt rows: the one implementation in omni_jax.speech (no model needed)."""
    shim = types.SimpleNamespace(cfg=cfg, tcfg=cfg.talker_config)
    return SpeechGenerator._positions(shim, talker_ids, audio_seqlens, image_grid, None, None)


def talker_layout(cfg: OmniConfig, ids, prompt_len: int, reply_len: int, codes, *, speaker: str, seq_len: int,
                  max_frames: int, thinker_len: int, audio_seqlens=None, image_grid=None) -> dict:
    """The talker fields of one example (see the module docstring), as numpy arrays.

    ids: the thinker sequence (prompt, reply tokens, <|im_end|>, ...); prompt_len: prompt tokens; reply_len: m
    reply tokens before <|im_end|> (the fed-back ones); codes int [F, Q]; thinker_len: T (the index base of the
    tts rows); audio_seqlens / image_grid: the prompt's media (mel frames per audio, (t, h, w) per image).
    Raises TalkerTrainError when the example does not fit or is not a speech example.
    """
    tcfg = cfg.talker_config
    ids = np.asarray(ids, np.int64)
    codes = np.asarray(codes, np.int64)
    q = tcfg.num_code_groups
    if codes.ndim != 2 or codes.shape[1] != q or codes.shape[0] == 0:
        raise TalkerTrainError(f"codec_codes must be a non-empty list of frames with {q} codes each (the "
                               f"talker's num_code_groups); got shape {list(codes.shape)}")
    v0, vr = tcfg.text_config.vocab_size, tcfg.code_predictor_config.vocab_size
    if codes.min() < 0 or codes[:, 0].max() >= v0 or (q > 1 and codes[:, 1:].max() >= vr):
        raise TalkerTrainError(f"codec_codes out of range: codebook 0 must be in [0, {v0}), codebooks 1.. in "
                               f"[0, {vr})")
    n_frames = codes.shape[0]
    if n_frames > max_frames:
        raise TalkerTrainError(f"{n_frames} codec frames exceed talker.max_frames={max_frames}")
    prompt = ids[:prompt_len]
    try:
        a_start = assistant_start(prompt, cfg)
        spk = speaker_id(cfg, speaker)
    except SpeechError as e:
        raise TalkerTrainError(str(e)) from e
    rows = prompt_len + reply_len  # thinker rows the talker may see (the reply's <|im_end|> is never fed back)
    if rows - a_start < 4:
        raise TalkerTrainError("a spoken answer needs at least one reply token after '<|im_start|>assistant\\n'")
    bos, eos, pad = thinker_len, thinker_len + 1, thinker_len + 2
    users = user_positions(prompt, cfg)
    th = cfg.thinker_config
    a = list(range(a_start, rows))
    text = [*users.tolist(), a[0], a[1], a[2], pad, pad, pad, pad, bos, a[3]]
    mm = [*np.isin(prompt[users], [th.audio_token_id, th.image_token_id, th.video_token_id]).tolist(),
          *[False] * ASSISTANT_ROWS]
    codec = [-1] * (len(users) + 3) + [tcfg.codec_nothink_id, tcfg.codec_think_bos_id, tcfg.codec_think_eos_id,
                                       spk, tcfg.codec_pad_id, tcfg.codec_bos_id]
    n_prompt_rows = len(text)
    trailing = [*a[4:], eos]  # then tts_pad
    text += [trailing[f] if f < len(trailing) else pad for f in range(n_frames + 1)]
    codec += [-1] * n_frames + [tcfg.codec_eos_token_id]
    total = len(text)
    if total > seq_len:
        raise TalkerTrainError(f"{total} talker rows ({n_prompt_rows} prompt rows + {n_frames} frames + EOS) "
                               f"exceed talker.seq_len={seq_len}")
    talker_ids = np.concatenate([prompt[users], np.full(ASSISTANT_ROWS, cfg.tts_pad_token_id, np.int64)])
    pos = _talker_positions(cfg, talker_ids, audio_seqlens, image_grid)
    last = pos[:, -1:]
    out = {"talker_text_src": np.full(seq_len, -1, np.int32), "talker_text_mm": np.zeros(seq_len, bool),
           "talker_codec_ids": np.full(seq_len, -1, np.int32), "talker_positions": np.zeros((3, seq_len), np.float32),
           "talker_valid": np.zeros(seq_len, bool), "talker_labels": np.full(seq_len, IGNORE, np.int32),
           "codec_codes": np.zeros((max_frames, q), np.int32), "codec_valid": np.zeros(max_frames, bool),
           "frame_start": np.int32(n_prompt_rows)}
    out["talker_text_src"][:total] = text
    out["talker_text_mm"][:n_prompt_rows] = mm
    out["talker_codec_ids"][:total] = codec
    out["talker_positions"][:, :n_prompt_rows] = pos
    out["talker_positions"][:, n_prompt_rows:total] = last + 1 + np.arange(n_frames + 1, dtype=np.float32)
    out["talker_valid"][:total] = True
    out["talker_labels"][n_prompt_rows:total - 1] = codes[:, 0]
    out["talker_labels"][total - 1] = tcfg.codec_eos_token_id
    out["codec_codes"][:n_frames] = codes
    out["codec_valid"][:n_frames] = True
    return out


class TalkerPreprocessor(D.Preprocessor):
    """`train.data.Preprocessor` plus the talker fields of a record with `codec_codes`."""

    def __init__(self, tokenizer, cfg: OmniConfig, c: D.DataConfig, base_dir: str, tc: TalkerTrainConfig):
        super().__init__(tokenizer, cfg, c, base_dir)
        self.tc = tc

    def example(self, text: str) -> dict:
        out = super().example(text)  # validates the JSON and messages
        rec = json.loads(text)
        if "codec_codes" not in rec:
            raise D.BadRecord("talker training needs the spoken answer's codec frames ('codec_codes')")
        prompt_len = int(np.argmax(out["loss_mask"]))
        reply_len = int(out["loss_mask"].sum()) - 1
        audio = None
        if "audio_valid" in out and out["audio_valid"].any():
            audio = [int(f) for f in out["audio_frames"][out["audio_valid"]]]
        images = None
        if "image_valid" in out and out["image_valid"].any():
            images = [D.image_grid(self.c)] * int(out["image_valid"].sum())
        try:
            out.update(talker_layout(self.cfg, out["input_ids"], prompt_len, reply_len, rec["codec_codes"],
                                     speaker=str(rec.get("speaker", self.tc.speaker)), seq_len=self.tc.seq_len,
                                     max_frames=self.tc.max_frames, thinker_len=self.c.seq_len,
                                     audio_seqlens=audio, image_grid=images))
        except (TalkerTrainError, ValueError, TypeError) as e:
            raise D.BadRecord(f"codec targets: {e}") from e
        return out


def talker_train_iterator(path: str, tokenizer, cfg: OmniConfig, c: D.DataConfig, tc: TalkerTrainConfig):
    """`train.data.TrainIterator` over records with codec targets (same pipeline, `TalkerPreprocessor`)."""
    return D.TrainIterator(path, tokenizer, cfg, c, make_preprocessor=lambda media: TalkerPreprocessor(
        tokenizer, cfg, c, media, tc))


def talker_eval_batches(path: str, tokenizer, cfg: OmniConfig, c: D.DataConfig, tc: TalkerTrainConfig,
                        max_examples: int | None = None):
    """One in-order pass over an eval file; the last batch is padded with empty (all-invalid) examples."""
    return D.eval_batches(path, tokenizer, cfg, c, max_examples,
                          make_preprocessor=lambda media: TalkerPreprocessor(tokenizer, cfg, c, media, tc))


stack = D.stack


# --------------------------------------------------------------------------------------------- in-graph loss


def _thinker_rows(model, batch: dict, *, image_grid=None, moe_impl: str = "auto"):
    """(thinker hidden_states[0] [B, T, Ht], hidden_states[accept_hidden_layer] or None). Text-only batches need
    only the embeddings (hidden_projection is used at multimodal rows only); with media the thinker runs."""
    th = model.thinker
    ids = batch["input_ids"]
    if "audio_features" not in batch and "image_pixels" not in batch:
        return th.embed(ids), None
    audio = image = None
    if "audio_features" in batch:
        f = batch["audio_features"]
        perm = TS._real_first(batch["audio_valid"])
        audio = (f.reshape(-1, *f.shape[2:])[perm], batch["audio_frames"].reshape(-1)[perm])
    if "image_pixels" in batch:
        px = batch["image_pixels"]
        perm = TS._real_first(batch["image_valid"])
        image = (px.reshape(-1, *px.shape[2:])[perm].reshape(-1, px.shape[-1]), image_grid)
    embeds, deepstack = th.input_embeddings(ids, audio=audio, image=image)
    k = model.cfg.talker_config.accept_hidden_layer
    _, _, stats = th.model(embeds, batch["positions"], TS.padded_causal_mask(batch["valid"]), deepstack=deepstack,
                           collect_hidden=(0, k), moe_impl=moe_impl)
    return stats["hidden"][0], stats["hidden"][k]


def _take_rows(x, idx):
    """x [B, N, H], idx int [B, M] -> [B, M, H]."""
    return jnp.take_along_axis(x, idx[..., None], axis=1)


def frame_embeddings(talker, codes):
    """Sum of a frame's Q codebook embeddings (the decode input): codes int [B, F, Q] -> [B, F, H]."""
    parts = [talker.embed_codes(codes[..., 0])[..., None, :]]
    if codes.shape[-1] > 1:
        parts.append(talker.code_predictor.residual_embeddings(codes[..., 1:]))
    return jnp.sum(jnp.concatenate(parts, axis=-2), axis=-2)


def talker_inputs(model, batch: dict, *, image_grid=None, moe_impl: str = "auto"):
    """The talker's input rows [B, T2, H] (text track + codec track), built as speech.py builds the prompt."""
    talker, cfg = model.talker, model.cfg
    with jax.named_scope("thinker_rows"):
        h0, h_acc = _thinker_rows(model, batch, image_grid=image_grid, moe_impl=moe_impl)
    b = h0.shape[0]
    with jax.named_scope("text_track"):
        tts = model.thinker.embed(jnp.asarray([cfg.tts_bos_token_id, cfg.tts_eos_token_id, cfg.tts_pad_token_id]))
        table = jnp.concatenate([h0, jnp.broadcast_to(tts[None].astype(h0.dtype), (b, 3, h0.shape[-1]))], axis=1)
        src = batch["talker_text_src"]
        idx = jnp.clip(src, 0, table.shape[1] - 1)
        text = talker.text_projection(_take_rows(table, idx))
        if h_acc is not None:
            acc = jnp.pad(h_acc, ((0, 0), (0, 3), (0, 0)))
            text = jnp.where(batch["talker_text_mm"][..., None], talker.hidden_projection(_take_rows(acc, idx)), text)
        text = jnp.where((src >= 0)[..., None], text, 0)
    with jax.named_scope("codec_track"):
        cid = batch["talker_codec_ids"]
        codec = jnp.where((cid >= 0)[..., None], talker.embed_codes(jnp.maximum(cid, 0)), 0)
        codes = batch["codec_codes"]
        frames = frame_embeddings(talker, codes)  # [B, F, H]
        fi = jnp.arange(src.shape[1])[None] - batch["frame_start"][:, None]
        in_frame = (fi >= 0) & (fi < jnp.sum(batch["codec_valid"], axis=-1)[:, None])
        placed = _take_rows(frames, jnp.clip(fi, 0, codes.shape[1] - 1))
        codec = codec + jnp.where(in_frame[..., None], placed, 0).astype(codec.dtype)
    return text.astype(codec.dtype) + codec


def code_predictor_logits(talker, h, codes):
    """Teacher-forced code predictor: h [N, H] (talker state per frame), codes int [N, Q] -> logits [N, Q-1, V]
    for codebooks 1..Q-1 (row q of the causal input [h, E_talker(c0), E_cp[0](c1), ...] with lm_head[q-1])."""
    cp = talker.code_predictor
    q = codes.shape[-1]
    rows = [h[:, None, :], talker.embed_codes(codes[:, 0])[:, None, :].astype(h.dtype)]
    if q > 2:
        rows.append(cp.model.codec_embedding(jnp.arange(q - 2)[None], codes[:, 1:q - 1]).astype(h.dtype))
    x = jnp.concatenate(rows, axis=1)  # [N, Q, H]
    n = x.shape[0]
    pos = jnp.broadcast_to(jnp.arange(q, dtype=jnp.int32)[None], (n, q))
    hidden, _ = cp.model(x, pos, jnp.tril(jnp.ones((q, q), bool))[None])
    kernel = cp.lm_head.kernel[...].astype(hidden.dtype)  # [Q-1, H, V]
    return jnp.einsum("nqh,qhv->nqv", hidden[:, 1:], kernel)


def talker_loss(model, batch: dict, cfg: TalkerTrainConfig, *, image_grid=None, moe_impl: str = "auto"):
    """total = talker_ce + mtp_weight * mtp_ce + aux_coef * talker load-balancing loss. Returns (total, metrics):
    talker_ce, mtp_ce, aux_loss, z_loss (talker router z-loss, not in the total), ce_loss (= talker_ce, for the
    trainer's log), target_tokens (codebook-0 targets, EOS included), c0_correct, code_targets / code_correct
    (residual codes), frames / frames_correct (all Q codes right, teacher-forced), exact_match_count (examples
    with every target right), examples."""
    talker = model.talker
    if talker is None:
        raise TalkerTrainError("talker training needs a model with its talker (model.parts must include 'talker')")
    tt = talker.cfg.text_config
    embeds = talker_inputs(model, batch, image_grid=image_grid, moe_impl=moe_impl)
    valid = batch["talker_valid"]
    t2 = valid.shape[1]
    mask = TS.padded_causal_mask(valid)  # talker_valid is a prefix of each row, as the thinker's valid
    positions = jnp.moveaxis(batch["talker_positions"], 1, 0)
    with jax.named_scope("talker_decoder"):
        hidden, _, stats = talker.model(embeds, positions, mask, moe_impl=moe_impl)
    with jax.named_scope("codec_head"):
        logits = talker.codec_head(hidden)
    labels = batch["talker_labels"][:, 1:]
    c0_mask = (labels >= 0) & valid[:, 1:]
    c0_tgt = jnp.maximum(labels, 0)
    talker_ce, n_c0 = TS.masked_cross_entropy(logits[:, :-1], c0_tgt, c0_mask)

    with jax.named_scope("code_predictor"):
        codes = batch["codec_codes"]
        b, f, q = codes.shape
        h = _take_rows(hidden, jnp.clip(batch["frame_start"][:, None] - 1 + jnp.arange(f)[None], 0, t2 - 1))
        cp_logits = code_predictor_logits(talker, h.reshape(b * f, -1), codes.reshape(b * f, q))
        cp_logits = cp_logits.reshape(b, f, q - 1, -1)
        fmask = batch["codec_valid"]
        cp_mask = jnp.broadcast_to(fmask[..., None], (b, f, q - 1))
        mtp_ce, n_codes = TS.masked_cross_entropy(cp_logits, codes[..., 1:], cp_mask)

    coef = tt.router_aux_loss_coef if cfg.aux_loss_coef is None else cfg.aux_loss_coef
    aux = TS.load_balancing_loss(stats["router"], valid, tt.num_experts) if tt.num_experts else jnp.float32(0)
    z = TS.router_z_loss(stats["router_logits"], valid)  # reported (the trainer logs z_loss), not trained on

    c0_ok = (jnp.argmax(logits[:, :-1], -1) == c0_tgt) & c0_mask
    code_ok = (jnp.argmax(cp_logits, -1) == codes[..., 1:]) & cp_mask
    frame_rows = jnp.clip(batch["frame_start"][:, None] - 1 + jnp.arange(f)[None], 0, t2 - 2)
    frame_c0_ok = jnp.take_along_axis(c0_ok, frame_rows, axis=1)  # logits row L-1+f: frame f's codebook 0
    frame_ok = frame_c0_ok & jnp.all(code_ok, axis=-1) & fmask
    row_ok = jnp.all(c0_ok | ~c0_mask, axis=-1) & jnp.all(code_ok | ~cp_mask, axis=(1, 2))
    has_tgt = jnp.any(c0_mask, axis=-1)
    metrics = {"talker_ce": talker_ce, "mtp_ce": mtp_ce, "aux_loss": aux, "z_loss": z, "ce_loss": talker_ce,
               "target_tokens": n_c0, "c0_correct": jnp.sum(c0_ok), "code_targets": n_codes,
               "code_correct": jnp.sum(code_ok), "frames": jnp.sum(fmask), "frames_correct": jnp.sum(frame_ok),
               "exact_match_count": jnp.sum(row_ok & has_tgt), "examples": jnp.sum(has_tgt)}
    return talker_ce + cfg.mtp_weight * mtp_ce + coef * aux, metrics


# ------------------------------------------------------------------------------------------ trainer hook


class TalkerTask:
    """What `train.loop.Trainer` needs for `train.task = "talker"`: the loss, the data, eval and log rows."""

    def __init__(self, tc: TalkerTrainConfig, toy_codec: dict | None = None):
        if tc.seq_len < ASSISTANT_ROWS + 2 or tc.max_frames < 1:
            raise TalkerTrainError(f"talker.seq_len must be >= {ASSISTANT_ROWS + 2} and talker.max_frames >= 1 "
                                   f"(got {tc.seq_len}, {tc.max_frames})")
        self.tc, self.toy_codec = tc, toy_codec

    @classmethod
    def from_config(cls, cfg) -> TalkerTask:
        """From an ml_collections config: the `talker` section (TalkerTrainConfig fields) and, for generated toy
        data, `toy.codec` (keyword arguments of `train.toy.codec_frames`)."""
        if "talker" not in cfg:
            raise TalkerTrainError("train.task=talker needs a `talker` config section (see configs/toy.py:talker)")
        d = dict(cfg.talker)
        fields = {f.name for f in dataclasses.fields(TalkerTrainConfig)}
        unknown = set(d) - fields
        if unknown:
            raise TalkerTrainError(f"unknown keys in config.talker: {sorted(unknown)}; known: {sorted(fields)}")
        toy = dict(cfg.toy.get("codec", {})) if "toy" in cfg else {}
        return cls(TalkerTrainConfig(**d), toy or None)

    def check_model(self, model):
        if getattr(model, "talker", None) is None:
            raise TalkerTrainError("train.task=talker needs the talker: set model.parts to include 'talker' (and a "
                                   "config with enable_audio_output)")

    @staticmethod
    def batch_dims() -> dict[str, int]:
        """The batch keys this task adds to the thinker's, each with its example dim (for mesh shardings)."""
        return dict(BATCH_DIMS)

    def toy_options(self) -> dict:
        return {} if self.toy_codec is None else {"codec": self.toy_codec}

    def loss(self, *, image_grid=None, moe_impl: str = "auto"):
        tc = self.tc

        def fn(model, batch):
            return talker_loss(model, batch, tc, image_grid=image_grid, moe_impl=moe_impl)

        return fn

    def train_iterator(self, path, tokenizer, cfg, c):
        return talker_train_iterator(path, tokenizer, cfg, c, self.tc)

    def evaluate(self, run_eval, path, tokenizer, cfg, c, max_examples=None) -> dict:
        """run_eval(numpy batch) -> metrics (host). Token-weighted CEs and accuracies over the eval file."""
        tot = dict.fromkeys(("talker", "mtp", "c0_tok", "code_tok", "c0_ok", "code_ok", "frames", "frames_ok",
                             "em", "n"), 0.0)
        for batch in talker_eval_batches(path, tokenizer, cfg, c, self.tc, max_examples):
            m = run_eval(batch)
            tot["talker"] += float(m["talker_ce"]) * float(m["target_tokens"])
            tot["mtp"] += float(m["mtp_ce"]) * float(m["code_targets"])
            for k, key in (("c0_tok", "target_tokens"), ("code_tok", "code_targets"), ("c0_ok", "c0_correct"),
                           ("code_ok", "code_correct"), ("frames", "frames"), ("frames_ok", "frames_correct"),
                           ("em", "exact_match_count"), ("n", "examples")):
                tot[k] += float(m[key])

        def div(a, b):
            return tot[a] / max(tot[b], 1.0)

        return {"eval_loss": div("talker", "c0_tok"), "eval_mtp_loss": div("mtp", "code_tok"),
                "eval_c0_accuracy": div("c0_ok", "c0_tok"), "eval_code_accuracy": div("code_ok", "code_tok"),
                "eval_frame_accuracy": div("frames_ok", "frames"), "eval_exact_match": div("em", "n"),
                "eval_examples": int(tot["n"])}

    @staticmethod
    def log_row(m) -> dict:
        """Extra per-step metrics for metrics.jsonl (teacher-forced accuracies of the batch)."""
        return {"talker_ce": float(m["talker_ce"]), "mtp_ce": float(m["mtp_ce"]),
                "c0_accuracy": float(m["c0_correct"]) / max(float(m["target_tokens"]), 1.0),
                "code_accuracy": float(m["code_correct"]) / max(float(m["code_targets"]), 1.0)}

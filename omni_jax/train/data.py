"""Training data: a Grain pipeline over ChatML JSONL records -> fixed-shape batches for `train.step`.

A record is one JSON object per line: `{"messages": [...]}` in the format of `omni-jax generate` messages files
(media paths relative to the JSONL file). The last turn must be the assistant's reply: it is the training target
(its tokens and the closing <|im_end|> get loss; every earlier turn, earlier assistant turns included, is
context). Each record becomes:

  input_ids int32 [T], positions float32 [3, T] (TM-RoPE of the prompt, then consecutive text positions),
  valid bool [T], loss_mask bool [T], and with media slots configured audio_features [A, mel, F],
  audio_frames [A], audio_valid [A], image_pixels [I, P, D], image_valid [I].

Shapes are static: sequences are right-padded to `seq_len`; every example has A audio and I image slots (empty
slots are dummies that no placeholder reads); images must all have the configured grid. A record that cannot
be used (malformed JSON, bad messages, missing media, too long, too many media, wrong image size) is skipped,
counted and logged with its line number and reason; past `max_bad_fraction` (after `min_records_for_fraction`
records) or `max_bad_records` the pipeline raises DataError.

Pipeline (Grain): line offsets -> MapDataset -> shuffle(seed) -> repeat (reshuffled each epoch) -> this host's
slice (process_index::process_count) -> map(preprocess) on reader threads -> filter(bad records) -> batch.
The iterator state (Grain's) plus the bad-record counters are a small JSON dict saved with each checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import grain
import jax
import numpy as np

from omni_jax.config import OmniConfig
from omni_jax.errors import OmniJaxError
from omni_jax.processing import chat
from omni_jax.processing.tokenizer import Tokenizer
from omni_jax.prompt import prepare_thinker_prompt

log = logging.getLogger("omni_jax.train.data")


# Empty audio slots get one mel frame: the audio encoder pads every chunk to the batch's longest one, so a
# long dummy would change the real audios' encodings (pitfall P5); one frame never does.
DUMMY_AUDIO_FRAMES = 1


class DataError(OmniJaxError):
    """The training data cannot be used: missing/empty file, or too many bad records."""


class BadRecord(Exception):
    """One record that is skipped (reason in the message)."""


@dataclasses.dataclass(frozen=True)
class DataConfig:
    seq_len: int = 128
    batch_size: int = 8
    audio_slots: int = 0  # audio inputs per example (0: text/image only)
    audio_frames: int = 0  # mel frames per audio slot (100 per second)
    image_slots: int = 0
    image_size: tuple[int, int] = (64, 64)  # every image must be this size (height, width)
    seed: int = 0
    max_bad_records: int = 1000
    max_bad_fraction: float = 0.1
    min_records_for_fraction: int = 50
    num_threads: int = 2
    prefetch: int = 32


def image_grid(c: DataConfig, patch: int = 16) -> tuple[int, int, int]:
    return (1, c.image_size[0] // patch, c.image_size[1] // patch)


def image_patch_dim(cfg: OmniConfig) -> int:
    v = cfg.thinker_config.vision_config
    return v.in_channels * v.temporal_patch_size * v.patch_size * v.patch_size


def batch_image_grid(c: DataConfig) -> tuple | None:
    """The static grid argument of the vision encoder for one batch (all slots of all examples)."""
    if not c.image_slots:
        return None
    return (image_grid(c),) * (c.batch_size * c.image_slots)


class JsonlSource:
    """Random access to the lines of a JSONL file by byte offset (Grain RandomAccessDataSource protocol)."""

    def __init__(self, path: str):
        path = os.path.abspath(path)
        if not os.path.isfile(path):
            raise DataError(f"data file not found: {path}")
        offsets = []
        with open(path, "rb") as f:
            pos = 0
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        if not offsets:
            raise DataError(f"data file {path} has no records")
        self.path, self.offsets = path, np.asarray(offsets, np.int64)

    def __len__(self):
        return len(self.offsets)

    def __getitem__(self, i):
        i = int(i) % len(self.offsets)
        with open(self.path, "rb") as f:
            f.seek(int(self.offsets[i]))
            return i, f.readline().decode("utf-8", errors="replace")


class Preprocessor:
    """(line number, text) -> example dict of fixed-shape numpy arrays, or {"bad": reason, "line": n}."""

    def __init__(self, tokenizer: Tokenizer, cfg: OmniConfig, c: DataConfig, base_dir: str):
        self.tok, self.cfg, self.c, self.base_dir = tokenizer, cfg, c, base_dir
        self.im_end = cfg.im_end_token_id
        self.newline = tokenizer.encode("\n")
        self.grid = image_grid(c)
        self.patch_dim = image_patch_dim(cfg)
        self.mel_bins = cfg.thinker_config.audio_config.num_mel_bins

    def __call__(self, item):
        line_no, text = item
        try:
            return self.example(text)
        except BadRecord as e:
            return {"bad": str(e), "line": line_no + 1}
        except OmniJaxError as e:  # messages / media problems found by the shared processing code
            return {"bad": str(e), "line": line_no + 1}

    def example(self, text: str) -> dict:
        c = self.c
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadRecord(f"malformed JSON ({e})") from e
        if not isinstance(rec, dict) or not isinstance(rec.get("messages"), list):
            raise BadRecord('a record must be an object {"messages": [...]}')
        messages = chat.parse_messages(rec["messages"], self.base_dir)
        if len(messages) < 2 or messages[-1].role != "assistant":
            raise BadRecord("the last message must be the assistant's reply (the training target)")
        reply = messages[-1].content
        if not isinstance(reply, str):
            if any(p.type != "text" for p in reply):
                raise BadRecord("the assistant reply must be text")
            reply = "".join(p.text for p in reply)
        prompt = prepare_thinker_prompt(self.tok, self.cfg, messages[:-1])
        answer = self.tok.encode(reply) + [self.im_end]
        ids = prompt.input_ids + answer + self.newline
        n, p = len(ids), len(prompt.input_ids)
        if n > c.seq_len:
            raise BadRecord(f"{n} tokens exceed seq_len={c.seq_len}")
        out = {"input_ids": np.zeros(c.seq_len, np.int32), "positions": np.zeros((3, c.seq_len), np.float32),
               "valid": np.zeros(c.seq_len, bool), "loss_mask": np.zeros(c.seq_len, bool)}
        out["input_ids"][:n] = ids
        # The reply is text: its positions continue from the prompt's last position on all three axes.
        last = prompt.positions[:, -1:].max()
        out["positions"][:, :p] = prompt.positions
        out["positions"][:, p:n] = last + 1 + np.arange(n - p, dtype=np.float32)
        out["valid"][:n] = True
        out["loss_mask"][p:p + len(answer)] = True
        self._audio(prompt, out)
        self._image(prompt, out)
        return out

    def _audio(self, prompt, out):
        c = self.c
        if prompt.audio is None:
            if c.audio_slots:
                out["audio_features"] = np.zeros((c.audio_slots, self.mel_bins, c.audio_frames), np.float32)
                out["audio_frames"] = np.full((c.audio_slots,), DUMMY_AUDIO_FRAMES, np.int32)
                out["audio_valid"] = np.zeros((c.audio_slots,), bool)
            return
        feats, frames = prompt.audio
        if len(frames) > c.audio_slots:
            raise BadRecord(f"{len(frames)} audio inputs; the config allows {c.audio_slots} (data.audio_slots)")
        if int(frames.max()) > c.audio_frames:
            raise BadRecord(f"audio of {int(frames.max())} mel frames exceeds data.audio_frames={c.audio_frames}")
        f = np.zeros((c.audio_slots, feats.shape[1], c.audio_frames), np.float32)
        t = min(feats.shape[2], c.audio_frames)
        f[:len(frames), :, :t] = feats[:, :, :t]
        fr = np.full((c.audio_slots,), DUMMY_AUDIO_FRAMES, np.int32)
        fr[:len(frames)] = frames
        out["audio_features"], out["audio_frames"] = f, fr
        out["audio_valid"] = np.arange(c.audio_slots) < len(frames)

    def _image(self, prompt, out):
        c = self.c
        if not c.image_slots:
            if prompt.image is not None:
                raise BadRecord("the record has images but data.image_slots is 0")
            return
        per = self.grid[0] * self.grid[1] * self.grid[2]
        px = np.zeros((c.image_slots, per, self.patch_dim), np.float32)
        valid = np.zeros((c.image_slots,), bool)
        if prompt.image is not None:
            pixels, grids = prompt.image
            if len(grids) > c.image_slots:
                raise BadRecord(f"{len(grids)} images; the config allows {c.image_slots} (data.image_slots)")
            if any(tuple(g) != self.grid for g in grids):
                raise BadRecord(f"image grid {list(grids)} differs from {self.grid}: images must be "
                                f"{c.image_size[0]}x{c.image_size[1]} (data.image_size)")
            px[:len(grids)] = pixels.reshape(len(grids), per, -1)
            valid[:len(grids)] = True
        out["image_pixels"], out["image_valid"] = px, valid


class BadRecordFilter:
    """Grain filter: drops {"bad": ...} items, counting and logging them; raises DataError past the limits."""

    def __init__(self, c: DataConfig, name: str):
        self.c, self.name = c, name
        self.seen = self.bad = 0

    def __call__(self, item) -> bool:
        self.seen += 1
        if "bad" not in item:
            return True
        self.bad += 1
        log.warning("%s line %d: skipped bad record: %s", self.name, item["line"], item["bad"])
        c = self.c
        if self.bad > c.max_bad_records or (self.seen >= c.min_records_for_fraction
                                            and self.bad / self.seen > c.max_bad_fraction):
            raise DataError(f"{self.name}: too many bad records ({self.bad} of {self.seen} read; limits "
                            f"data.max_bad_records={c.max_bad_records}, data.max_bad_fraction="
                            f"{c.max_bad_fraction}); last at line {item['line']}: {item['bad']}")
        return False


class TrainIterator:
    """Infinite batches of a JSONL file; `state()` / `restore(state)` make resumption exact."""

    def __init__(self, path: str, tokenizer: Tokenizer, cfg: OmniConfig, c: DataConfig, *, make_preprocessor=None):
        """make_preprocessor(media_dir) -> a record -> example callable (default: the thinker's Preprocessor;
        talker training passes its own)."""
        src = JsonlSource(path)
        self.filter = BadRecordFilter(c, os.path.basename(path))
        ds = grain.MapDataset.source(src).shuffle(seed=c.seed).repeat(None)
        ds = ds[jax.process_index()::jax.process_count()]  # this host's share
        media_dir = os.path.dirname(src.path)
        ds = ds.map(make_preprocessor(media_dir) if make_preprocessor else Preprocessor(tokenizer, cfg, c, media_dir))
        opts = grain.ReadOptions(num_threads=c.num_threads, prefetch_buffer_size=c.prefetch)
        ds = ds.to_iter_dataset(opts).filter(self.filter).batch(c.batch_size, drop_remainder=True)
        self.it = iter(ds)

    def __next__(self) -> dict:
        return next(self.it)

    def __iter__(self):
        return self

    def state(self) -> dict:
        return {"grain": self.it.get_state(), "seen": self.filter.seen, "bad": self.filter.bad}

    def restore(self, state: dict):
        self.it.set_state(state["grain"])
        self.filter.seen, self.filter.bad = int(state["seen"]), int(state["bad"])


def eval_batches(path: str, tokenizer: Tokenizer, cfg: OmniConfig, c: DataConfig, max_examples: int | None = None,
                 *, make_preprocessor=None):
    """One pass over an eval file in order, in batches of the training shape (the last is padded with empty
    examples, which have no targets and count for nothing). make_preprocessor: as for TrainIterator."""
    src = JsonlSource(path)
    media_dir = os.path.dirname(src.path)
    pre = make_preprocessor(media_dir) if make_preprocessor else Preprocessor(tokenizer, cfg, c, media_dir)
    filt = BadRecordFilter(c, os.path.basename(path))
    n = len(src) if max_examples is None else min(len(src), max_examples)
    buf = []
    for i in range(n):
        ex = pre(src[i])
        if filt(ex):
            buf.append(ex)
        if len(buf) == c.batch_size:
            yield stack(buf)
            buf = []
    if buf:
        empty = jax.tree.map(np.zeros_like, buf[0])  # all-invalid: no targets
        yield stack(buf + [empty] * (c.batch_size - len(buf)))


def stack(examples: list[dict]) -> dict:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

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
be used (malformed JSON, bad messages, missing media, too long, too many media, wrong image size) leaves an
empty row (no tokens, no targets) in its batch, is counted and logged with its line number and reason; past
`max_bad_fraction` (after `min_records_for_fraction` records) or `max_bad_records` the pipeline raises DataError.

Pipeline (Grain): line offsets -> MapDataset -> shuffle(seed) -> repeat (reshuffled each epoch): one global stream
of records; `data.batch_size` is the global batch, and each process reads only its rows of every batch (the rows
its devices hold under the batch sharding, `process_rows`), map(preprocess) on reader threads -> bad records
become empty rows -> batch. The same global batches whatever the process count. The iterator state (global
batches read, bad-record counters per process) is a small JSON dict saved with each checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os

import grain
import jax
import numpy as np

from omni_jax import paths
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
    """Random access to the lines of a JSONL file by byte offset (Grain RandomAccessDataSource protocol). The path
    may be a URL (omni_jax.paths); media paths in its records are read from the local disk."""

    def __init__(self, path: str):
        path = paths.resolve(path)
        if not paths.exists(path) or paths.isdir(path):
            raise DataError(f"data file not found: {path}")
        offsets = []
        with paths.path(path).open("rb") as f:
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
        with paths.path(self.path).open("rb") as f:
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
    """Tells {"bad": ...} items apart (False), counting and logging them; raises DataError past the limits."""

    def __init__(self, c: DataConfig, name: str):
        self.c, self.name = c, name
        self.seen = self.bad = 0

    def __call__(self, item) -> bool:
        self.seen += 1
        if "bad" not in item:
            return True
        self.bad += 1
        log.warning("%s line %d: bad record (an empty row in its batch): %s", self.name, item["line"], item["bad"])
        c = self.c
        if self.bad > c.max_bad_records or (self.seen >= c.min_records_for_fraction
                                            and self.bad / self.seen > c.max_bad_fraction):
            raise DataError(f"{self.name}: too many bad records ({self.bad} of {self.seen} read; limits "
                            f"data.max_bad_records={c.max_bad_records}, data.max_bad_fraction="
                            f"{c.max_bad_fraction}); last at line {item['line']}: {item['bad']}")
        return False


def process_rows(batch_sharding, global_batch: int) -> tuple[int, int]:
    """[start, stop): the rows of every global batch that this process's devices hold when the example dim is split
    by `batch_sharding` (a sharding of a [global_batch] array; None: one process holds everything)."""
    if batch_sharding is None:
        return 0, global_batch
    spans = sorted({(s[0].start or 0, global_batch if s[0].stop is None else s[0].stop)
                    for s in batch_sharding.addressable_devices_indices_map((global_batch,)).values()})
    for (_, stop), (start, _) in zip(spans, spans[1:], strict=False):
        if start != stop:
            raise DataError(f"this process's devices hold rows {spans} of each batch, not one contiguous block; "
                            f"put the mesh axes that span processes first (data, then fsdp)")
    return spans[0][0], spans[-1][1]


def _empty_example(src: JsonlSource, pre, c: DataConfig, name: str) -> dict:
    """All-zero arrays shaped like an example (no valid tokens, no targets): what a bad record's row holds.
    Shapes come from the first usable record of the file."""
    for i in range(min(len(src), c.max_bad_records + 1)):
        ex = pre(src[i])
        if "bad" not in ex:
            return jax.tree.map(np.zeros_like, ex)
    raise DataError(f"{name}: none of the first {min(len(src), c.max_bad_records + 1)} records can be used "
                    f"(line 1: {pre(src[0])['bad']})")


class TrainIterator:
    """Infinite batches of this process's rows of the global batches of a JSONL file; `state()` / `restore(state)`
    make resumption exact.

    The records are shuffled (seed data.seed; reshuffled each epoch) into one global stream; global batch k is
    stream positions [k*B, (k+1)*B) (B = data.batch_size, the global batch), and this process reads and
    preprocesses only its rows [start, stop) of each (`process_rows`). The sequence of global batches is the same
    for any process count; a bad record leaves an empty row (no targets) in its batch, so it cannot shift the
    records of other processes."""

    def __init__(self, path: str, tokenizer: Tokenizer, cfg: OmniConfig, c: DataConfig, *, make_preprocessor=None,
                 rows: tuple[int, int] | None = None):
        """make_preprocessor(media_dir) -> a record -> example callable (default: the thinker's Preprocessor;
        talker training passes its own). rows: this process's [start, stop) of each batch (default: all)."""
        src = JsonlSource(path)
        self.c, self.rows = c, rows or (0, c.batch_size)
        self.filter = BadRecordFilter(c, os.path.basename(src.path))
        media_dir = os.path.dirname(src.path)
        self.pre = make_preprocessor(media_dir) if make_preprocessor else Preprocessor(tokenizer, cfg, c, media_dir)
        self.empty = _empty_example(src, self.pre, c, self.filter.name)
        self.stream = grain.MapDataset.source(src).shuffle(seed=c.seed).repeat(None)
        self.batches = 0
        self.it = self._iterator(0)

    def _iterator(self, first_batch: int):
        big, (start, stop) = self.c.batch_size, self.rows
        n, stream = stop - start, self.stream

        def record(i):  # this process's i-th example: row start + i % n of global batch i // n
            k, j = divmod(i, n)
            return stream[k * big + start + j]

        ds = grain.MapDataset.range(first_batch * n, len(stream) // big * n).map(record).map(self.pre)
        opts = grain.ReadOptions(num_threads=self.c.num_threads, prefetch_buffer_size=self.c.prefetch)
        ds = ds.to_iter_dataset(opts).map(self._keep).batch(n, drop_remainder=True)
        return iter(ds)

    def _keep(self, item):
        return item if self.filter(item) else self.empty

    def __next__(self) -> dict:
        batch = next(self.it)
        self.batches += 1
        return batch

    def __iter__(self):
        return self

    def state(self) -> dict:
        """{"batches": global batches read, "seen" / "bad": record counters, one entry per process}. Called by
        every process at the same step (a checkpoint save)."""
        counts = np.asarray([[self.filter.seen, self.filter.bad]], np.int64)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            counts = np.asarray(multihost_utils.process_allgather(counts)).reshape(-1, 2)
        return {"batches": self.batches, "seen": counts[:, 0].tolist(), "bad": counts[:, 1].tolist()}

    def restore(self, state: dict, batches: int | None = None):
        """Continue after `state["batches"]` global batches (`batches` for states written before that key). A
        different process count restarts the counters from their sums on process 0."""
        k = int(state.get("batches", batches if batches is not None else 0))
        seen, bad = state.get("seen", 0), state.get("bad", 0)
        seen, bad = ([x] if isinstance(x, int) else list(x) for x in (seen, bad))
        me = jax.process_index()
        if len(seen) == jax.process_count():
            self.filter.seen, self.filter.bad = int(seen[me]), int(bad[me])
        else:
            self.filter.seen, self.filter.bad = (sum(seen), sum(bad)) if me == 0 else (0, 0)
        self.batches = k
        self.it = self._iterator(k)


def eval_batches(path: str, tokenizer: Tokenizer, cfg: OmniConfig, c: DataConfig, max_examples: int | None = None,
                 *, make_preprocessor=None, rows: tuple[int, int] | None = None):
    """One pass over an eval file in order: global batch k is records [k*B, (k+1)*B), of which this process
    yields its rows [start, stop) (`rows`, default all). Rows past the end or holding a bad record are empty
    examples (no targets; they count for nothing). make_preprocessor: as for TrainIterator."""
    src = JsonlSource(path)
    media_dir = os.path.dirname(src.path)
    pre = make_preprocessor(media_dir) if make_preprocessor else Preprocessor(tokenizer, cfg, c, media_dir)
    filt = BadRecordFilter(c, os.path.basename(src.path))
    empty = _empty_example(src, pre, c, filt.name)
    n = len(src) if max_examples is None else min(len(src), max_examples)
    start, stop = rows or (0, c.batch_size)
    for k in range(-(-n // c.batch_size)):
        out = []
        for i in range(k * c.batch_size + start, k * c.batch_size + stop):
            ex = pre(src[i]) if i < n else empty
            out.append(ex if i >= n or filt(ex) else empty)
        yield stack(out)


def stack(examples: list[dict]) -> dict:
    return {k: np.stack([e[k] for e in examples]) for k in examples[0]}

"""The toy Omni task: procedurally generated multimodal questions with one exact answer each.

- audio: a 1 s clip with 1-4 beeps of one pitch (low 330 Hz / mid 880 Hz / high 1760 Hz), random timing
  and loudness; "How many tones, and what pitch?" -> e.g. "3 high".
- image: a 64x64 picture of one coloured shape (red/green/blue circle/square/triangle) at a random place and
  size on a light background; "What shape is this?" -> e.g. "red circle".
- text: "What is 3 plus 4?" -> "7" (single digits).
- speak: "Read aloud: red circle" -> "red circle" (1-3 words of the other tasks' answers); with `codec=...`
  every record also gets synthetic codec targets for its spoken answer (talker training, `codec_frames`).

`write_toy_dataset(out_dir, ...)` writes `train.jsonl` / `eval.jsonl` in the ChatML record format of
`train.data` with the media files beside them, deterministically from a seed (eval uses another seed, so its
samples are new draws). `toy_model_config()` is the small Omni config that learns it on CPU.
"""

from __future__ import annotations

import json
import os

import numpy as np

from omni_jax.config import OmniConfig, tiny

SAMPLE_RATE = 16000
CLIP_SECONDS = 1.0
PITCHES = {"low": 330.0, "mid": 880.0, "high": 1760.0}
COLOURS = {"red": (220, 40, 40), "green": (30, 170, 60), "blue": (40, 70, 230)}
SHAPES = ("circle", "square", "triangle")
IMAGE_SIZE = 64
TASKS = ("audio", "image", "text")
ALL_TASKS = (*TASKS, "speak")
SPEAK_WORDS = (*PITCHES, *COLOURS, *SHAPES, "one", "two", "three", "four")
AUDIO_QUESTION = "How many tones, and what pitch?"
IMAGE_QUESTION = "What shape is this?"


def tone_clip(rng: np.random.Generator, count: int, pitch: str) -> np.ndarray:
    """float32 [16000]: `count` beeps of 0.1 s (5 ms ramps) separated by 80-120 ms gaps, plus faint noise."""
    n = int(SAMPLE_RATE * CLIP_SECONDS)
    wav = rng.normal(0, 0.003, n).astype(np.float32)
    t = float(rng.uniform(0.0, 0.05))
    beep = int(0.1 * SAMPLE_RATE)
    ramp = np.minimum(1.0, np.minimum(np.arange(beep), np.arange(beep)[::-1]) / (0.005 * SAMPLE_RATE))
    freq = PITCHES[pitch] * float(rng.uniform(0.97, 1.03))
    for _ in range(count):
        start = int(t * SAMPLE_RATE)
        amp = float(rng.uniform(0.3, 0.8))
        wav[start:start + beep] += amp * ramp * np.sin(2 * np.pi * freq * np.arange(beep) / SAMPLE_RATE)
        t += 0.1 + float(rng.uniform(0.08, 0.12))
    return wav


def shape_image(rng: np.random.Generator, colour: str, shape: str) -> np.ndarray:
    """uint8 [64, 64, 3]: one filled shape of size 36-52 px on a light grey background."""
    from PIL import Image, ImageDraw

    bg = int(rng.integers(200, 256))
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (bg, bg, bg))
    d = ImageDraw.Draw(img)
    size = int(rng.integers(36, 53))
    x0, y0 = (int(v) for v in rng.integers(0, IMAGE_SIZE - size + 1, 2))
    box = (x0, y0, x0 + size - 1, y0 + size - 1)
    fill = tuple(int(np.clip(c + rng.integers(-20, 21), 0, 255)) for c in COLOURS[colour])
    if shape == "circle":
        d.ellipse(box, fill=fill)
    elif shape == "square":
        d.rectangle(box, fill=fill)
    else:
        d.polygon([(x0 + size // 2, y0), (x0, y0 + size - 1), (x0 + size - 1, y0 + size - 1)], fill=fill)
    return np.asarray(img)


def make_record(rng: np.random.Generator, kind: str, media_dir: str, name: str) -> dict:
    """One {"messages": [...]} record (media written under media_dir, referenced relative to its parent)."""
    rel = os.path.basename(media_dir)
    if kind == "audio":
        import soundfile

        count, pitch = int(rng.integers(1, 5)), str(rng.choice(list(PITCHES)))
        soundfile.write(os.path.join(media_dir, f"{name}.wav"), tone_clip(rng, count, pitch), SAMPLE_RATE,
                        subtype="PCM_16")
        user = [{"type": "audio", "path": f"{rel}/{name}.wav"}, {"type": "text", "text": AUDIO_QUESTION}]
        answer = f"{count} {pitch}"
    elif kind == "image":
        from PIL import Image

        colour, shape = str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))
        Image.fromarray(shape_image(rng, colour, shape)).save(os.path.join(media_dir, f"{name}.png"))
        user = [{"type": "image", "path": f"{rel}/{name}.png"}, {"type": "text", "text": IMAGE_QUESTION}]
        answer = f"{colour} {shape}"
    elif kind == "text":
        a, b = (int(v) for v in rng.integers(0, 10, 2))
        user = f"What is {a} plus {b}?"
        answer = str(a + b)
    elif kind == "speak":
        answer = " ".join(str(w) for w in rng.choice(SPEAK_WORDS, int(rng.integers(1, 4))))
        user = f"Read aloud: {answer}"
    else:
        raise ValueError(f"unknown toy task {kind!r}; choose from {ALL_TASKS}")
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def codec_frames(token_ids, num_code_groups: int = 4, frames_per_token: int = 2, codebook_size: int = 2048,
                 seed: int = 0) -> np.ndarray:
    """Synthetic codec targets of a spoken answer: int32 [len(token_ids) * frames_per_token, num_code_groups].

    Token t's k-th frame has code perm_q[(t * frames_per_token + k) % codebook_size] in codebook q, with one
    fixed random permutation per codebook (from `seed`): a deterministic, learnable target in which codebook 0
    identifies (token, k) whenever vocab * frames_per_token <= codebook_size (the tiny vocab: 512 * 2 <= 2048),
    so the residual codebooks follow from codebook 0. Codes stay below codebook_size (2048: the code
    predictor's vocabulary, and below the talker's special codec ids).
    """
    if num_code_groups < 1 or frames_per_token < 1 or codebook_size < 1:
        raise ValueError("codec_frames needs num_code_groups, frames_per_token and codebook_size >= 1")
    rng = np.random.default_rng(seed)
    perms = np.stack([rng.permutation(codebook_size) for _ in range(num_code_groups)], axis=1)  # [V, Q]
    ids = np.asarray(token_ids, np.int64).reshape(-1)
    slots = (ids[:, None] * frames_per_token + np.arange(frames_per_token)[None]).reshape(-1) % codebook_size
    return perms[slots].astype(np.int32)


def _tiny_tokenizer(out_dir: str):
    from omni_jax.processing.tiny_tokenizer import write_tiny_tokenizer
    from omni_jax.processing.tokenizer import Tokenizer

    path = os.path.join(out_dir, "tokenizer")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        write_tiny_tokenizer(path)
    return Tokenizer.from_dir(path)


def write_split(out_dir: str, split: str, n: int, seed: int, tasks=TASKS, codec: dict | None = None) -> str:
    """codec: keyword arguments of `codec_frames`; each record then gets "codec_codes" for its answer's tokens
    under the tiny tokenizer (the toy model's)."""
    media = os.path.join(out_dir, f"{split}_media")
    os.makedirs(media, exist_ok=True)
    rng = np.random.default_rng(seed)
    tok = _tiny_tokenizer(out_dir) if codec is not None else None
    path = os.path.join(out_dir, f"{split}.jsonl")
    with open(path + ".tmp", "w") as f:
        for i in range(n):
            kind = tasks[i % len(tasks)]
            rec = make_record(rng, kind, media, f"{i:06d}")
            if tok is not None:
                rec["codec_codes"] = codec_frames(tok.encode(rec["messages"][-1]["content"]), **codec).tolist()
            f.write(json.dumps(rec) + "\n")
    os.replace(path + ".tmp", path)
    return path


def write_example_question(out_dir: str, kind: str = "audio", seed: int = 2_000_017) -> tuple[str, str]:
    """A new generated question for `omni-jax generate` (a seed the train/eval splits never use): writes
    out_dir/question.json (the user turn; media beside it) and returns (messages path, expected answer)."""
    media = os.path.join(out_dir, "question_media")
    os.makedirs(media, exist_ok=True)
    rec = make_record(np.random.default_rng(seed), kind, media, "q")
    path = os.path.join(out_dir, "question.json")
    with open(path, "w") as f:
        json.dump(rec["messages"][:1], f, indent=1)
    answer = rec["messages"][1]["content"]
    with open(os.path.join(out_dir, "question_answer.txt"), "w") as f:
        f.write(answer + "\n")
    return path, answer


def write_toy_dataset(out_dir: str, n_train: int = 3000, n_eval: int = 150, seed: int = 0,
                      tasks=TASKS, codec: dict | None = None) -> tuple[str, str]:
    """(train.jsonl, eval.jsonl) paths; reuses existing files written with the same settings. codec: see
    `write_split` (codec targets for talker training)."""
    os.makedirs(out_dir, exist_ok=True)
    stamp = os.path.join(out_dir, "toy.json")
    want = {"n_train": n_train, "n_eval": n_eval, "seed": seed, "tasks": list(tasks)}
    if codec is not None:
        want["codec"] = dict(codec)
    train, evals = os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "eval.jsonl")
    if os.path.exists(stamp) and os.path.exists(train) and os.path.exists(evals):
        with open(stamp) as f:
            if json.load(f) == want:
                return train, evals
    train = write_split(out_dir, "train", n_train, seed, tasks, codec)
    evals = write_split(out_dir, "eval", n_eval, seed + 1_000_003, tasks, codec)
    with open(stamp, "w") as f:
        json.dump(want, f)
    return train, evals


def toy_model_config(speech: bool = False) -> OmniConfig:
    """The tiny preset (the thinker learns the toy task); with `speech` it keeps its talker, code predictor and
    Code2Wav (the main job exports them untrained, so the toy export can speak; `configs/toy.py:talker` trains a
    talker)."""
    return tiny(enable_audio_output=speech)

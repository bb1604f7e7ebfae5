"""A tiny Qwen-style tokenizer and processor settings for the `tiny` preset (omni_jax.config.TINY_TOKENS).

`write_tiny_tokenizer(out_dir)` writes a byte-level BPE tokenizer of `TINY_VOCAB` (512) ids laid out like the
released Qwen tokenizer, only smaller:

- ids 0..255: the 256 byte tokens in GPT-2 byte-to-unicode order (so "\\n" is id 198, as in Qwen);
- ids 256..495: merges learned deterministically from a small embedded English corpus;
- ids 502/503/504: "system"/"user"/"assistant" — ordinary BPE words (as 8948/872/77091 are in Qwen), learned
  first so that each encodes to one id;
- the Qwen special tokens at the ids of `TINY_TOKENS`.

Files: `tokenizer.json`, `tokenizer_config.json` (with the model-specific token names `Qwen3OmniMoeProcessor`
reads), `special_tokens_map.json`, `chat_template.jinja`. `write_processor_config(out_dir, layout)` adds the
feature-extractor / image / video settings in the transformers-5 layout (`processor_config.json`) or the layout
of the released checkpoints (`preprocessor_config.json`, `video_preprocessor_config.json`, `chat_template.json`).
Only `tokenizers` and the standard library are used; transformers is not needed to write these files.
"""

from __future__ import annotations

import collections
import json
import os

from tokenizers import AddedToken, Tokenizer

from omni_jax.config import TINY_TOKENS, TINY_VOCAB
from omni_jax.processing.tokenizer import qwen2_backend, qwen2_pre_tokenizer

# Special-token strings of the released Qwen3-Omni tokenizer, keyed by TINY_TOKENS names.
SPECIAL_TOKEN_STRINGS = {
    "endoftext": "<|endoftext|>",
    "im_start": "<|im_start|>",
    "im_end": "<|im_end|>",
    "vision_start": "<|vision_start|>",
    "vision_end": "<|vision_end|>",
    "image_pad": "<|image_pad|>",
    "video_pad": "<|video_pad|>",
    "audio_start": "<|audio_start|>",
    "audio_end": "<|audio_end|>",
    "tts_pad": "<tts_pad>",  # 151671 in the release
    "tts_bos": "<tts_text_bos>",  # 151672
    "tts_eos": "<tts_text_eod>",  # 151673
    "audio_pad": "<|audio_pad|>",
}
ROLE_WORDS = ("system", "user", "assistant")

# The names Qwen3OmniMoeProcessor reads from its tokenizer (tokenizer.image_token etc.).
MODEL_SPECIFIC_TOKENS = {
    "image_token": "<|image_pad|>",
    "audio_token": "<|audio_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
    "audio_bos_token": "<|audio_start|>",
    "audio_eos_token": "<|audio_end|>",
}

_CORPUS = """\
The quick brown fox jumps over the lazy dog. A small model can still learn the shape of language when it reads
enough text. This is a tiny tokenizer for tests: it turns ordinary English words into pieces that are longer
than one byte, so that the tests see real merges and real decoding. Please describe what you hear in the audio,
and what you see in the image and in the video. The weather is nice today, and the sun is shining over the
river. What is the capital of France? The capital of France is Paris. How many legs does a spider have? A
spider has eight legs. Tell me a short story about a robot who wanted to sing. Once upon a time there was a
robot that lived in a quiet town, and every night it listened to the birds and tried to sing their songs.
You are a helpful assistant. You are a friendly voice assistant that answers in one or two sentences.
Thank you for your question. I think the answer is yes, but let me check the details before I say more.
Numbers like 12, 345 and 6789 are split into single digits. Hello, world! Good morning, how are you?
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (the order Qwen's first 256 ids follow)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    byte_values = printable[:]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            byte_values.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(byte_values, chars)}


def _learn_merges(word_counts: dict[tuple[str, ...], int], n_merges: int) -> list[tuple[str, str]]:
    """Plain BPE training: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    words = {w: c for w, c in word_counts.items() if len(w) > 1}
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, c in words.items():
            for a, b in zip(w[:-1], w[1:]):
                pairs[(a, b)] += c
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = {}
        for w, c in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == best:
                    out.append(w[i] + w[i + 1])
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            if len(out) > 1:
                merged[tuple(out)] = merged.get(tuple(out), 0) + c
        words = merged
    return merges


def _apply_merges(word: tuple[str, ...], merges: list[tuple[str, str]]) -> tuple[str, ...]:
    for pair in merges:
        out, i = [], 0
        while i < len(word):
            if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
                out.append(word[i] + word[i + 1])
                i += 2
            else:
                out.append(word[i])
                i += 1
        word = tuple(out)
    return word


def build_tiny_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The tiny vocabulary (ordinary tokens and special tokens, all 512 ids) and its ranked merge list."""
    byte_chars = bytes_to_unicode()
    byte_order = list(byte_chars.values())  # dict insertion order = GPT-2 order
    n_special = len(SPECIAL_TOKEN_STRINGS)
    n_merges = TINY_VOCAB - 256 - n_special  # 243: 240 corpus merges + the 3 role words' final merges

    # 1. Role words first, so each becomes one token whatever the corpus merges are.
    role_merges = _learn_merges({tuple(w): 1 for w in ROLE_WORDS}, 64)
    # 2. Corpus merges on top (the role merges already applied to the corpus words).
    pre = qwen2_pre_tokenizer()
    counts = collections.Counter(piece for piece, _ in pre.pre_tokenize_str(_CORPUS))
    corpus_words = collections.Counter()
    for piece, c in counts.items():
        corpus_words[_apply_merges(tuple(piece), role_merges)] += c
    corpus_merges = _learn_merges(dict(corpus_words), n_merges - len(role_merges))
    merges = role_merges + corpus_merges
    if len(merges) != n_merges:
        raise RuntimeError(f"the tiny corpus gave {len(merges)} merges, need {n_merges}")

    vocab = {ch: i for i, ch in enumerate(byte_order)}
    free_ids = iter(i for i in range(256, TINY_VOCAB) if i not in TINY_TOKENS.values())
    role_ids = {w: TINY_TOKENS[w] for w in ROLE_WORDS}
    for a, b in merges:
        tok = a + b
        if tok in vocab:
            raise RuntimeError(f"duplicate merge result {tok!r}")
        vocab[tok] = role_ids[tok] if tok in role_ids else next(free_ids)
    for name, content in SPECIAL_TOKEN_STRINGS.items():
        vocab[content] = TINY_TOKENS[name]
    if sorted(vocab.values()) != list(range(TINY_VOCAB)):
        raise RuntimeError("tiny vocabulary does not fill ids 0..TINY_VOCAB-1 exactly")
    return vocab, merges


def build_tiny_tokenizer() -> Tokenizer:
    """The tiny tokenizer as a `tokenizers.Tokenizer` (Qwen2 pipeline: NFC, regex split, byte-level BPE)."""
    vocab, merges = build_tiny_vocab()
    tok = qwen2_backend(vocab, merges)
    # Specials are also vocabulary entries (they sit between ordinary ids), so adding them keeps their ids.
    specials = sorted(SPECIAL_TOKEN_STRINGS.values(), key=lambda s: vocab[s])
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    for s in specials:
        if tok.token_to_id(s) != vocab[s]:
            raise RuntimeError(f"special token {s} landed at {tok.token_to_id(s)}, expected {vocab[s]}")
    for w in ROLE_WORDS:
        if tok.encode(w).ids != [TINY_TOKENS[w]]:
            raise RuntimeError(f"role word {w!r} must encode to one id, got {tok.encode(w).ids}")
    return tok


# ---------------------------------------------------------------------------------------------------------------
# Chat template: Qwen3-Omni style ChatML. Content parts render as in the release: audio ->
# <|audio_start|><|audio_pad|><|audio_end|>, image -> <|vision_start|><|image_pad|><|vision_end|>, video ->
# <|vision_start|><|video_pad|><|vision_end|>, text verbatim. Assistant turns before the last user query drop
# their <think> part (Qwen3 behaviour); no default system message.

CHAT_TEMPLATE = """\
{%- macro render_content(content) -%}
    {%- if content is string -%}
        {{- content -}}
    {%- else -%}
        {%- for part in content -%}
            {%- if part.type == 'audio' or 'audio' in part or 'audio_url' in part -%}
                {{- '<|audio_start|><|audio_pad|><|audio_end|>' -}}
            {%- elif part.type == 'image' or 'image' in part or 'image_url' in part -%}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' -}}
            {%- elif part.type == 'video' or 'video' in part -%}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' -}}
            {%- elif part.type == 'text' -%}
                {{- part.text -}}
            {%- else -%}
                {{- raise_exception('unsupported content part type: ' ~ part.type) -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(last_query_index=messages|length - 1) -%}
{%- for message in messages[::-1] -%}
    {%- set index = (messages|length - 1) - loop.index0 -%}
    {%- if message.role == 'user' and ns.last_query_index == messages|length - 1 -%}
        {%- set ns.last_query_index = index -%}
    {%- endif -%}
{%- endfor -%}
{%- for message in messages -%}
    {%- set content = render_content(message.content) -%}
    {%- if message.role == 'system' or message.role == 'user' -%}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' -}}
    {%- elif message.role == 'assistant' -%}
        {%- set reasoning = '' -%}
        {%- if message.reasoning_content is string -%}
            {%- set reasoning = message.reasoning_content -%}
        {%- elif '</think>' in content -%}
            {%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') -%}
        {%- endif -%}
        {%- if loop.index0 > ns.last_query_index and reasoning -%}
            {{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n'
                + content.lstrip('\\n') + '<|im_end|>\\n' -}}
        {%- else -%}
            {{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' -}}
        {%- endif -%}
    {%- else -%}
        {{- raise_exception('unsupported role: ' ~ message.role) -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\\n' -}}
    {%- if enable_thinking is defined and enable_thinking is false -%}
        {{- '<think>\\n\\n</think>\\n\\n' -}}
    {%- endif -%}
{%- endif -%}
"""


def _added_tokens_decoder(vocab: dict[str, int]) -> dict[str, dict]:
    return {
        str(vocab[s]): {"content": s, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": True}
        for s in sorted(SPECIAL_TOKEN_STRINGS.values(), key=lambda s: vocab[s])
    }


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")


def tokenizer_config(vocab: dict[str, int]) -> dict:
    """tokenizer_config.json as the released Qwen3-Omni checkpoints carry it (Qwen2Tokenizer, eos <|im_end|>)."""
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens_decoder(vocab),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": SPECIAL_TOKEN_STRINGS["im_end"],
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": SPECIAL_TOKEN_STRINGS["endoftext"],
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
        **MODEL_SPECIFIC_TOKENS,
    }


def write_tiny_tokenizer(out_dir: str | os.PathLike, *, vocab_files: bool = False) -> str:
    """Write the tiny tokenizer files into `out_dir` (created if missing); returns the directory.

    vocab_files=True also writes `vocab.json` + `merges.txt` (the older slow-tokenizer layout).
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    tok = build_tiny_tokenizer()
    vocab, merges = build_tiny_vocab()
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), tokenizer_config(vocab))
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), {
        "eos_token": SPECIAL_TOKEN_STRINGS["im_end"], "pad_token": SPECIAL_TOKEN_STRINGS["endoftext"],
        **MODEL_SPECIFIC_TOKENS})
    with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(CHAT_TEMPLATE)
    if vocab_files:
        write_vocab_files(out_dir, vocab, merges)
    return out_dir


def write_vocab_files(out_dir: str, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """vocab.json and merges.txt (with its version header).

    Unlike Qwen's vocab.json, this one also lists the special tokens: in the tiny vocabulary they sit between
    ordinary ids, and transformers numbers added tokens missing from vocab.json from the vocabulary size on.
    """
    _write_json(os.path.join(out_dir, "vocab.json"), dict(sorted(vocab.items(), key=lambda kv: kv[1])))
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
        for a, b in merges:
            f.write(f"{a} {b}\n")


# ---------------------------------------------------------------------------------------------------------------
# Processor settings (spec §4.1, §5.1, §5.2): the released values.

FEATURE_EXTRACTOR_SETTINGS = {
    "feature_extractor_type": "WhisperFeatureExtractor",
    "feature_size": 128,
    "sampling_rate": 16000,
    "hop_length": 160,
    "n_fft": 400,
    "chunk_length": 300,
    "n_samples": 4_800_000,
    "nb_max_frames": 30000,
    "padding_side": "right",
    "padding_value": 0.0,
    "dither": 0.0,
    "return_attention_mask": True,
}
IMAGE_PROCESSOR_SETTINGS = {
    "image_processor_type": "Qwen2VLImageProcessor",
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "merge_size": 2,
    "patch_size": 16,
    "temporal_patch_size": 2,
    "resample": 3,
    "rescale_factor": 1 / 255,
    "size": {"shortest_edge": 3136, "longest_edge": 12_845_056},
}
VIDEO_PROCESSOR_SETTINGS = {
    **{k: v for k, v in IMAGE_PROCESSOR_SETTINGS.items() if k != "image_processor_type"},
    "video_processor_type": "Qwen2VLVideoProcessor",
    "do_sample_frames": False,
    "size": {"shortest_edge": 128 * 32 * 32, "longest_edge": 768 * 32 * 32},
    "min_frames": 4,
    "max_frames": 768,
    "max_video_tokens": 128000,
    "return_metadata": False,
}


def write_processor_config(out_dir: str | os.PathLike, layout: str = "v5") -> str:
    """Write the processor settings (and, for "legacy", chat_template.json) into `out_dir`.

    layout="v5": one nested `processor_config.json` (as transformers 5's `save_pretrained` writes it) beside
    `chat_template.jinja`. layout="legacy": `preprocessor_config.json` (feature extractor + image processor keys
    in one flat dict, as the released checkpoints carry it), `video_preprocessor_config.json` and
    `chat_template.json`.
    """
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    if layout == "v5":
        _write_json(os.path.join(out_dir, "processor_config.json"), {
            "processor_class": "Qwen3OmniMoeProcessor",
            "feature_extractor": dict(FEATURE_EXTRACTOR_SETTINGS),
            "image_processor": dict(IMAGE_PROCESSOR_SETTINGS),
            "video_processor": dict(VIDEO_PROCESSOR_SETTINGS),
        })
        with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
            f.write(CHAT_TEMPLATE)
    elif layout == "legacy":
        # The released files also spell the pixel budget as min_pixels / max_pixels.
        image = IMAGE_PROCESSOR_SETTINGS
        video = VIDEO_PROCESSOR_SETTINGS
        _write_json(os.path.join(out_dir, "preprocessor_config.json"), {
            **FEATURE_EXTRACTOR_SETTINGS, **image, "min_pixels": image["size"]["shortest_edge"],
            "max_pixels": image["size"]["longest_edge"], "processor_class": "Qwen3OmniMoeProcessor"})
        _write_json(os.path.join(out_dir, "video_preprocessor_config.json"), {
            **video, "min_pixels": video["size"]["shortest_edge"], "max_pixels": video["size"]["longest_edge"],
            "processor_class": "Qwen3OmniMoeProcessor"})
        _write_json(os.path.join(out_dir, "chat_template.json"), {"chat_template": CHAT_TEMPLATE})
        jinja = os.path.join(out_dir, "chat_template.jinja")
        if os.path.exists(jinja):
            os.remove(jinja)
    else:
        raise ValueError(f"unknown processor config layout {layout!r}; expected 'v5' or 'legacy'")
    return out_dir

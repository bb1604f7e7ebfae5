"""Tokenizer, chat template and processor settings read from a Qwen3-Omni checkpoint directory.

`Tokenizer.from_dir(path)` reads `tokenizer.json` with the `tokenizers` library; a directory that has only
`vocab.json` + `merges.txt` gets the same byte-level BPE rebuilt (Qwen2's NFC normalizer, regex split and
byte-level mapping) plus the added tokens listed in `tokenizer_config.json` (`added_tokens_decoder`).
The chat template comes from `chat_template.jinja`, `chat_template.json` or `tokenizer_config.json`, in that
order, and is rendered the way transformers renders it: a sandboxed jinja2 environment with `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, `raise_exception`, `strftime_now` and a non-escaping `tojson`,
and the tokenizer's named special tokens (`eos_token`, `image_token`, ...) as template variables.

`load_processor_settings(path)` reads the feature-extractor / image / video processor settings from either the
transformers-5 layout (one nested `processor_config.json`) or the older one (`preprocessor_config.json` +
`video_preprocessor_config.json`) and fills what is missing with the released values (spec §4.1, §5.1, §5.2).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as _Backend

from omni_jax.errors import OmniJaxError

# Qwen2's pre-tokenizer regex (also in transformers' tokenization_qwen2.py and every Qwen tokenizer.json).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# The standard named special tokens plus the model-specific names Qwen3OmniMoeProcessor reads.
NAMED_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token",
                    "image_token", "audio_token", "video_token", "vision_bos_token", "vision_eos_token",
                    "audio_bos_token", "audio_eos_token")


class TokenizerError(OmniJaxError):
    """A tokenizer directory that cannot be read, or a chat template that cannot be rendered."""


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: invalid JSON ({e})") from e


def _token_content(v) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def qwen2_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Regex split (isolated) followed by byte-level mapping, as Qwen2's tokenizer.json declares it."""
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])


def qwen2_backend(vocab: dict[str, int], merges: list[tuple[str, str]]) -> _Backend:
    """Qwen2's byte-level BPE pipeline (NFC, regex split, byte-level BPE, byte-level decoder), no added tokens."""
    tok = _Backend(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                              continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                              byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = qwen2_pre_tokenizer()
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def _read_merges(path: str) -> list[tuple[str, str]]:
    merges = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f):
            line = line.rstrip("\n")
            if not line or (n == 0 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"{path}:{n + 1}: a merge line must hold two tokens, got {line!r}")
            merges.append((parts[0], parts[1]))
    return merges


def _backend_from_vocab_files(directory: str, added: dict[int, dict]) -> _Backend:
    """Rebuild Qwen2's byte-level BPE from vocab.json + merges.txt and add the added tokens at their ids."""
    vocab = _read_json(os.path.join(directory, "vocab.json"))
    merges = _read_merges(os.path.join(directory, "merges.txt"))
    # Added tokens go into the model vocabulary too: the tokenizers library then keeps their declared ids even
    # when they do not directly follow the ordinary ones (tokenizers would otherwise number them from the
    # vocabulary size on).
    full = dict(vocab)
    for idx, tok in added.items():
        if tok["content"] in full and full[tok["content"]] != idx:
            raise TokenizerError(f"added token {tok['content']!r} has id {idx} but vocab.json gives "
                                 f"{full[tok['content']]}")
        full[tok["content"]] = idx
    backend = qwen2_backend(full, merges)
    for idx in sorted(added):
        t = added[idx]
        at = AddedToken(t["content"], single_word=t.get("single_word", False), lstrip=t.get("lstrip", False),
                        rstrip=t.get("rstrip", False), normalized=t.get("normalized", not t.get("special")),
                        special=t.get("special", False))
        if t.get("special", False):
            backend.add_special_tokens([at])
        else:
            backend.add_tokens([at])
        if backend.token_to_id(t["content"]) != idx:
            raise TokenizerError(f"added token {t['content']!r} landed at id {backend.token_to_id(t['content'])}, "
                                 f"tokenizer_config.json says {idx}")
    return backend


# ---------------------------------------------------------------------------------------------------------------
# Chat template rendering (as transformers.utils.chat_template_utils does it)


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Like transformers: no HTML escaping, and the json.dumps options exposed.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def compile_chat_template(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template does not parse: {e}") from e


def _load_chat_template(directory: str, config: dict) -> str | None:
    path = os.path.join(directory, "chat_template.jinja")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    path = os.path.join(directory, "chat_template.json")
    if os.path.exists(path):
        tpl = _read_json(path).get("chat_template")
        if isinstance(tpl, str):
            return tpl
    tpl = config.get("chat_template")
    if isinstance(tpl, list):  # [{"name": ..., "template": ...}, ...]
        tpl = {t["name"]: t["template"] for t in tpl}.get("default")
    return tpl if isinstance(tpl, str) else None


# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Tokenizer:
    """A byte-level BPE tokenizer with its special tokens and chat template.

    backend: the `tokenizers.Tokenizer`; named_tokens: e.g. {"eos_token": "<|im_end|>", "image_token": ...};
    special_ids: content -> id of every added token marked special.
    """

    backend: _Backend
    named_tokens: dict[str, str]
    special_ids: dict[str, int]
    chat_template: str | None = None
    generation_eos_ids: tuple[int, ...] = ()
    _compiled: jinja2.Template | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> Tokenizer:
        directory = os.fspath(path)
        if not os.path.isdir(directory):
            raise TokenizerError(f"tokenizer directory not found: {directory}")
        cfg_path = os.path.join(directory, "tokenizer_config.json")
        config = _read_json(cfg_path) if os.path.exists(cfg_path) else {}
        added = {int(k): v for k, v in (config.get("added_tokens_decoder") or {}).items()}
        tj = os.path.join(directory, "tokenizer.json")
        if os.path.exists(tj):
            try:
                backend = _Backend.from_file(tj)
            except Exception as e:  # the Rust error types are not exported
                raise TokenizerError(f"{tj}: cannot be read by the tokenizers library ({e})") from e
            for idx, t in added.items():  # tokens only tokenizer_config.json declares
                if backend.token_to_id(t["content"]) is None:
                    raise TokenizerError(f"tokenizer_config.json declares added token {t['content']!r} (id {idx}) "
                                         "that tokenizer.json lacks")
        elif os.path.exists(os.path.join(directory, "vocab.json")) and os.path.exists(
                os.path.join(directory, "merges.txt")):
            backend = _backend_from_vocab_files(directory, added)
        else:
            raise TokenizerError(f"{directory}: no tokenizer.json, and no vocab.json + merges.txt")

        named = {}
        special_map_path = os.path.join(directory, "special_tokens_map.json")
        sources = [config]
        if os.path.exists(special_map_path):
            sources.insert(0, _read_json(special_map_path))  # tokenizer_config.json wins
        for src in sources:
            for key in NAMED_TOKEN_KEYS:
                content = _token_content(src.get(key))
                if content is not None:
                    named[key] = content
            for key, val in (src.get("model_specific_special_tokens") or {}).items():
                if _token_content(val) is not None:
                    named[key] = _token_content(val)
        for key, content in named.items():
            if backend.token_to_id(content) is None:
                raise TokenizerError(f"{key}={content!r} is not in the vocabulary of {directory}")

        special_ids = {}
        for tok in backend.get_added_tokens_decoder().values():
            if tok.special:
                special_ids[tok.content] = backend.token_to_id(tok.content)

        gen_eos: tuple[int, ...] = ()
        gen_path = os.path.join(directory, "generation_config.json")
        if os.path.exists(gen_path):
            eos = _read_json(gen_path).get("eos_token_id")
            if eos is not None:
                gen_eos = tuple(eos) if isinstance(eos, list) else (int(eos),)
        return cls(backend=backend, named_tokens=named, special_ids=special_ids,
                   chat_template=_load_chat_template(directory, config), generation_eos_ids=gen_eos)

    # -- vocabulary ------------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int:
        idx = self.backend.token_to_id(token)
        if idx is None:
            raise TokenizerError(f"token {token!r} is not in the vocabulary")
        return idx

    def id_to_token(self, idx: int) -> str:
        tok = self.backend.id_to_token(idx)
        if tok is None:
            raise TokenizerError(f"id {idx} is outside the vocabulary")
        return tok

    def named_id(self, name: str) -> int:
        """Id of a named special token, e.g. named_id("image_token") -> id of <|image_pad|>."""
        if name not in self.named_tokens:
            raise TokenizerError(f"the tokenizer names no {name!r}")
        return self.token_to_id(self.named_tokens[name])

    @property
    def eos_ids(self) -> list[int]:
        """Ids that end generation: generation_config.json's eos_token_id when the directory has one, otherwise
        the tokenizer's eos_token (<|im_end|> for Qwen3-Omni)."""
        if self.generation_eos_ids:
            return list(self.generation_eos_ids)
        return [self.named_id("eos_token")] if "eos_token" in self.named_tokens else []

    @property
    def pad_id(self) -> int | None:
        return self.named_id("pad_token") if "pad_token" in self.named_tokens else None

    # -- text <-> ids ----------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in the text are recognised. No BOS is added (Qwen has
        none)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat template ---------------------------------------------------------------------------------------

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True, **kwargs) -> str:
        """Render `messages` (dicts with "role" and "content": a string or a list of parts) to the prompt text.

        Extra keyword arguments become template variables (e.g. enable_thinking=False), overriding the named
        special tokens, as in transformers.
        """
        if self.chat_template is None:
            raise TokenizerError("this tokenizer directory has no chat template (chat_template.jinja, "
                                 "chat_template.json or tokenizer_config.json['chat_template'])")
        if self._compiled is None:
            self._compiled = compile_chat_template(self.chat_template)
        msgs = [dict(m) for m in messages]
        for m in msgs:  # transformers copies reasoning under its aliases before rendering
            reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if m.get(k) is not None),
                             None)
            if reasoning is not None:
                m.setdefault("thinking", reasoning)
                m["reasoning_content"] = reasoning
        variables = {**self.named_tokens, **kwargs}
        try:
            return self._compiled.render(messages=msgs, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **variables)
        except jinja2.exceptions.TemplateError as e:
            raise TokenizerError(f"chat template failed: {e}") from e


# ---------------------------------------------------------------------------------------------------------------
# Processor settings

FEATURE_EXTRACTOR_DEFAULTS = {
    "feature_size": 128, "sampling_rate": 16000, "hop_length": 160, "n_fft": 400, "chunk_length": 300,
    "n_samples": 4_800_000, "nb_max_frames": 30000, "padding_value": 0.0, "dither": 0.0,
    "return_attention_mask": True,
}
IMAGE_PROCESSOR_DEFAULTS = {
    "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": 3136, "max_pixels": 12_845_056,
    "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "rescale_factor": 1 / 255, "do_resize": True,
    "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "resample": 3,
}
VIDEO_PROCESSOR_DEFAULTS = {
    **IMAGE_PROCESSOR_DEFAULTS, "min_pixels": 128 * 32 * 32, "max_pixels": 768 * 32 * 32,
    "do_sample_frames": False, "fps": None, "min_frames": 4, "max_frames": 768,
}
# Qwen3OmniMoeProcessor's own call defaults (processor attributes); they override the sub-processors' files.
PROCESSOR_DEFAULTS = {
    "seconds_per_chunk": 2.0, "position_id_per_seconds": 13.0, "n_window": 50, "default_video_fps": 1.0,
    "audio_padding": "longest", "text_padding_side": "left",
}
# Keys of the flat legacy preprocessor_config.json that belong to the feature extractor.
_FEATURE_EXTRACTOR_KEYS = set(FEATURE_EXTRACTOR_DEFAULTS) | {"feature_extractor_type", "padding_side",
                                                              "processor_class"}


def _vision_settings(saved: dict, defaults: dict) -> dict:
    """Fill defaults and reconcile size{shortest_edge, longest_edge} with min_pixels / max_pixels (the
    Qwen2-VL processors let min_pixels / max_pixels override size)."""
    out = {**defaults, **{k: v for k, v in saved.items() if k in defaults}}
    size = saved.get("size") or {}
    out["min_pixels"] = saved.get("min_pixels", size.get("shortest_edge", defaults["min_pixels"]))
    out["max_pixels"] = saved.get("max_pixels", size.get("longest_edge", defaults["max_pixels"]))
    return out


def load_processor_settings(path: str | os.PathLike) -> dict:
    """{"feature_extractor": {...}, "image_processor": {...}, "video_processor": {...}, "processor": {...},
    "layout": "v5" | "legacy" | "defaults"} read from a checkpoint directory.

    Effective values, as Qwen3OmniMoeProcessor uses them: the video pixel budget is the processor's own default
    (131,072..786,432 per frame), which overrides a saved video processor `size` (the saved one is kept as
    `saved_min_pixels` / `saved_max_pixels`); audio always returns an attention mask.
    """
    directory = os.fspath(path)
    v5 = os.path.join(directory, "processor_config.json")
    legacy = os.path.join(directory, "preprocessor_config.json")
    video_legacy = os.path.join(directory, "video_preprocessor_config.json")
    if os.path.exists(v5):
        cfg = _read_json(v5)
        fe, image, video = (cfg.get("feature_extractor") or {}, cfg.get("image_processor") or {},
                            cfg.get("video_processor") or {})
        layout = "v5"
    elif os.path.exists(legacy):
        flat = _read_json(legacy)
        fe = {k: v for k, v in flat.items() if k in _FEATURE_EXTRACTOR_KEYS}
        image = {k: v for k, v in flat.items() if k not in _FEATURE_EXTRACTOR_KEYS}
        # Without its own file the video processor is built from preprocessor_config.json.
        video = _read_json(video_legacy) if os.path.exists(video_legacy) else image
        layout = "legacy"
    else:
        fe, image, video, layout = {}, {}, {}, "defaults"
    for name, section in (("feature_extractor", fe), ("image_processor", image), ("video_processor", video)):
        if not isinstance(section, dict):
            raise TokenizerError(f"{directory}: processor settings '{name}' must be a JSON object")

    feature = {**FEATURE_EXTRACTOR_DEFAULTS, **{k: v for k, v in fe.items() if k in FEATURE_EXTRACTOR_DEFAULTS}}
    feature["return_attention_mask"] = True  # the processor's audio_kwargs force it
    video_out = _vision_settings(video, VIDEO_PROCESSOR_DEFAULTS)
    video_out["saved_min_pixels"], video_out["saved_max_pixels"] = video_out["min_pixels"], video_out["max_pixels"]
    video_out["min_pixels"] = VIDEO_PROCESSOR_DEFAULTS["min_pixels"]
    video_out["max_pixels"] = VIDEO_PROCESSOR_DEFAULTS["max_pixels"]
    return {"feature_extractor": feature, "image_processor": _vision_settings(image, IMAGE_PROCESSOR_DEFAULTS),
            "video_processor": video_out, "processor": dict(PROCESSOR_DEFAULTS), "layout": layout}

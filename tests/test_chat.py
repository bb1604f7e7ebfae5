"""Tokenizer, chat template, messages files and prompt building against transformers' Qwen3OmniMoeProcessor."""

import json
import os
import shutil

import hf_fixtures
import numpy as np
import pytest

from omni_jax.config import TINY_TOKENS, TINY_VOCAB
from omni_jax.processing.chat import (
    Message,
    MessagesError,
    build_prompt,
    load_messages,
    media_parts,
    parse_messages,
    render_prompt,
)
from omni_jax.processing.tiny_tokenizer import write_processor_config, write_tiny_tokenizer
from omni_jax.processing.tokenizer import Tokenizer, TokenizerError, load_processor_settings

needs_processor = hf_fixtures.needs_torchvision
LAYOUTS = ("v5", "legacy")

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "user assistant system users Users  spaces   and\ttabs\n\nnew lines\r\n",
    "Numbers 12345 and 3.14159; symbols #$%&*()!? émigré naïve façade 中文 😀 e\u0301",  # NFC: e + combining acute
    "<|im_start|>user\nHi<|im_end|>\n<|audio_start|><|audio_pad|><|audio_end|><tts_pad><tts_text_bos>x",
    "",
]
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "<think>\nThe user asks a fact.\n</think>\n\nThe capital of France is Paris."},
    {"role": "user", "content": [{"type": "text", "text": "And of "}, {"type": "text", "text": "Italy?"}]},
]


def _sine(seconds: float, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(round(seconds * sr))) / sr
    return (0.3 * np.sin(2 * np.pi * 440.0 * t)).astype(np.float32)


def _image(h: int, w: int, seed: int):
    from PIL import Image

    return Image.fromarray((np.random.RandomState(seed).rand(h, w, 3) * 255).astype(np.uint8))


def _write_media(tmp_path):
    """Dummy media files: the chat code only checks that they exist."""
    for name in ("a1.wav", "a2.wav", "img.png", "clip.mp4"):
        (tmp_path / name).write_bytes(b"\0")


def _multimodal_messages(tmp_path) -> list[Message]:
    _write_media(tmp_path)
    data = [
        {"role": "system", "content": [{"type": "text", "text": "You are a helpful assistant."}]},
        {"role": "user", "content": [{"type": "audio", "path": "a1.wav"}, {"type": "image", "path": "img.png"},
                                     {"type": "text", "text": "What do you hear and see?"}]},
        {"role": "assistant", "content": "A tone and some noise."},
        {"role": "user", "content": [{"type": "video", "path": "clip.mp4", "fps": 2.0},
                                     {"type": "audio", "path": "a2.wav"}, {"type": "text", "text": "And now?"}]},
    ]
    path = tmp_path / "messages.json"
    path.write_text(json.dumps(data))
    return load_messages(path)


# ---------------------------------------------------------------------------------------------------------------
# The tiny tokenizer


def test_tiny_tokenizer_layout(tiny_tokenizer_dir_factory):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir_factory("v5"))
    assert tok.vocab_size == TINY_VOCAB
    names = {"im_start": "<|im_start|>", "im_end": "<|im_end|>", "endoftext": "<|endoftext|>",
             "audio_pad": "<|audio_pad|>", "audio_start": "<|audio_start|>", "audio_end": "<|audio_end|>",
             "image_pad": "<|image_pad|>", "video_pad": "<|video_pad|>", "vision_start": "<|vision_start|>",
             "vision_end": "<|vision_end|>", "tts_pad": "<tts_pad>", "tts_bos": "<tts_text_bos>",
             "tts_eos": "<tts_text_eod>"}
    for key, content in names.items():
        assert tok.token_to_id(content) == TINY_TOKENS[key], key
        assert content in tok.special_ids
    for role in ("system", "user", "assistant"):
        assert tok.encode(role) == [TINY_TOKENS[role]]
        assert role not in tok.special_ids  # an ordinary word: survives skip_special_tokens
        assert tok.decode([TINY_TOKENS[role]], skip_special_tokens=True) == role
    assert tok.encode("\n") == [198]  # the byte order of Qwen's vocabulary
    text = TEXTS[0]
    assert len(tok.encode(text)) < len(text.encode()) / 2  # ordinary words get multi-byte tokens
    assert tok.eos_ids == [TINY_TOKENS["im_end"]]
    assert tok.named_id("image_token") == TINY_TOKENS["image_pad"]


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_hf(tiny_tokenizer_dir_factory, text):
    from transformers import AutoTokenizer

    d = tiny_tokenizer_dir_factory("v5")
    ours, hf = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(d)
    ids = ours.encode(text)
    assert ids == hf(text)["input_ids"]
    assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    import unicodedata

    assert ours.decode(ids, skip_special_tokens=False) == unicodedata.normalize("NFC", text)  # round trip


def test_vocab_merges_only_dir_gives_same_ids(tmp_path):
    from transformers import AutoTokenizer

    full = write_tiny_tokenizer(tmp_path / "full")
    slow = write_tiny_tokenizer(tmp_path / "slow", vocab_files=True)
    os.remove(os.path.join(slow, "tokenizer.json"))
    ours_full, ours_slow = Tokenizer.from_dir(full), Tokenizer.from_dir(slow)
    hf_slow = AutoTokenizer.from_pretrained(slow)
    assert ours_slow.special_ids == ours_full.special_ids
    for text in TEXTS:
        ids = ours_full.encode(text)
        assert ours_slow.encode(text) == ids
        assert hf_slow(text)["input_ids"] == ids
        assert ours_slow.decode(ids, skip_special_tokens=True) == ours_full.decode(ids, skip_special_tokens=True)


def test_qwen_style_vocab_files_with_trailing_added_tokens(tmp_path):
    """Released-Qwen layout: vocab.json without the specials, which follow it in tokenizer_config.json."""
    from transformers import AutoTokenizer

    src = write_tiny_tokenizer(tmp_path / "src", vocab_files=True)
    vocab = json.load(open(os.path.join(src, "vocab.json")))
    cfg = json.load(open(os.path.join(src, "tokenizer_config.json")))
    # Renumber: ordinary tokens 0..N-1 (their order kept), then the specials in their old order.
    specials = {v["content"] for v in cfg["added_tokens_decoder"].values()}
    ordinary = sorted((t for t in vocab if t not in specials), key=vocab.get)
    new_vocab = {t: i for i, t in enumerate(ordinary)}
    old_added = sorted(cfg["added_tokens_decoder"].items(), key=lambda kv: int(kv[0]))
    cfg["added_tokens_decoder"] = {str(len(new_vocab) + i): v for i, (_, v) in enumerate(old_added)}
    d = tmp_path / "qwen_like"
    d.mkdir()
    json.dump(new_vocab, open(d / "vocab.json", "w"))
    shutil.copy(os.path.join(src, "merges.txt"), d / "merges.txt")
    json.dump(cfg, open(d / "tokenizer_config.json", "w"))
    ours, hf = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(str(d))
    assert ours.token_to_id("<|im_start|>") == len(new_vocab) + [v["content"] for _, v in old_added].index(
        "<|im_start|>")
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"]


def test_tokenizer_dir_errors(tmp_path):
    with pytest.raises(TokenizerError, match="not found"):
        Tokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    d = write_tiny_tokenizer(tmp_path / "t")
    os.remove(os.path.join(d, "chat_template.jinja"))
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.from_dir(d).apply_chat_template([{"role": "user", "content": "hi"}])
    tok = Tokenizer.from_dir(d)
    with pytest.raises(TokenizerError, match="not in the vocabulary"):
        tok.token_to_id("<|nope|>")


# ---------------------------------------------------------------------------------------------------------------
# Chat template and prompts against the HF processor


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_template_rendering_matches_hf_tokenizer(tiny_tokenizer_dir_factory, add_generation_prompt):
    """Works without torchvision: transformers' tokenizer-level chat template rendering."""
    from transformers import AutoTokenizer

    d = tiny_tokenizer_dir_factory("v5")
    ours, hf = Tokenizer.from_dir(d), AutoTokenizer.from_pretrained(d)
    for conv in (CONVERSATION, CONVERSATION[:3], CONVERSATION[1:2]):
        want = hf.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, tokenize=False)
        assert ours.apply_chat_template(conv, add_generation_prompt=add_generation_prompt) == want
    want = hf.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, tokenize=False,
                                  enable_thinking=False)
    assert ours.apply_chat_template(CONVERSATION[:2], enable_thinking=False) == want
    assert want.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


JINJA_FEATURES_TEMPLATE = """{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message.role not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('bad role') }}
    {% endif %}
    {% set ns.n = ns.n + 1 %}
    <{{ message.role }}>{{ message.content | tojson }}
    {% if loop.last %}{% break %}{% endif %}
{% endfor %}
n={{ ns.n }} eos={{ eos_token }} image={{ image_token }}
{% if add_generation_prompt %}<gen>{% endif %}
"""


def test_jinja_environment_matches_hf(tiny_tokenizer_dir_factory):
    """trim_blocks / lstrip_blocks, tojson without HTML escaping, namespace, loop controls, token variables."""
    import dataclasses

    from transformers import AutoTokenizer

    d = tiny_tokenizer_dir_factory("v5")
    ours = dataclasses.replace(Tokenizer.from_dir(d), chat_template=JINJA_FEATURES_TEMPLATE, _compiled=None)
    hf = AutoTokenizer.from_pretrained(d)
    conv = [{"role": "user", "content": "a <b> & \"c\" é"}, {"role": "assistant", "content": "ok"}]
    want = hf.apply_chat_template(conv, chat_template=JINJA_FEATURES_TEMPLATE, add_generation_prompt=True,
                                  tokenize=False)
    assert ours.apply_chat_template(conv) == want
    assert "<b> &" in want and "eos=<|im_end|> image=<|image_pad|>" in want
    with pytest.raises(TokenizerError, match="bad role"):
        ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_fixture_dirs_hold_the_variant_configs(tiny_hf_dir_b):
    """Variant b's directory: its config, sharded weights, and a re-initialisation that touched every tensor."""
    import dataclasses

    import torch

    from omni_jax.config import OmniConfig

    cfg, want = OmniConfig.from_hf(tiny_hf_dir_b), hf_fixtures.variant_config("b")
    assert cfg.thinker_config == want.thinker_config and cfg.code2wav_config == want.code2wav_config
    # speaker_id is kept as ordered pairs, and config.json may list the speakers in another order
    norm = lambda t: dataclasses.replace(t, speaker_id=tuple(sorted(t.speaker_id)))  # noqa: E731
    assert norm(cfg.talker_config) == norm(want.talker_config)
    text = cfg.thinker_config.text_config
    assert text.head_dim * text.num_attention_heads != text.hidden_size and not text.norm_topk_prob
    index = json.load(open(os.path.join(tiny_hf_dir_b, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) > 1
    model = hf_fixtures.hf_model_from_dir(tiny_hf_dir_b)
    _, fresh = hf_fixtures.build_tiny_hf_model("b")
    fresh_params = dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32
        assert torch.equal(p, fresh_params[name]), name  # deterministic build
        if p.numel() > 1:
            assert p.std() > 0, name
        assert not torch.all(p == 0) and not torch.all(p == 1) and not torch.all(p == 0.01), name
    assert Tokenizer.from_dir(tiny_hf_dir_b).eos_ids == [TINY_TOKENS["im_end"]]


@needs_processor
@pytest.mark.parametrize("layout", LAYOUTS)
def test_text_conversation_matches_hf_processor(tiny_tokenizer_dir_factory, layout):
    d = tiny_tokenizer_dir_factory(layout)
    ours, proc = Tokenizer.from_dir(d), hf_fixtures.load_hf_processor(d)
    for conv in (CONVERSATION, CONVERSATION[:3]):
        text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
        assert render_prompt(ours, conv) == text
        want = proc(text=text, return_tensors="np")["input_ids"][0].tolist()
        got = build_prompt(ours, parse_messages(conv))
        assert got == want
    t = TINY_TOKENS
    assert got[:3] == [t["im_start"], t["system"], 198] and got[-3:] == [t["im_start"], t["assistant"], 198]


@needs_processor
@pytest.mark.parametrize("layout", LAYOUTS)
def test_multimodal_prompt_matches_hf_processor(tiny_tokenizer_dir_factory, tmp_path, layout):
    """Two audios of different lengths, an image and a video: placeholders expand in order of appearance."""
    from transformers.models.qwen3_omni_moe.processing_qwen3_omni_moe import _get_feat_extract_output_lengths

    d = tiny_tokenizer_dir_factory(layout)
    ours, proc = Tokenizer.from_dir(d), hf_fixtures.load_hf_processor(d)
    messages = _multimodal_messages(tmp_path)
    conv = [m.to_template() for m in messages]
    text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    assert render_prompt(ours, messages) == text
    audios = [_sine(1.3), _sine(2.7)]
    video = (np.random.RandomState(2).rand(4, 64, 96, 3) * 255).astype(np.uint8)
    out = proc(text=text, audio=audios, images=[_image(64, 64, 0)], videos=[video], return_tensors="np")
    want = out["input_ids"][0].tolist()

    audio_counts = [int(n) for n in _get_feat_extract_output_lengths(out["feature_attention_mask"].sum(-1))]
    image_counts = [int(np.prod(g)) // 4 for g in out["image_grid_thw"]]
    video_counts = [int(np.prod(g)) // 4 for g in out["video_grid_thw"]]
    assert audio_counts == [17, 35]  # 130 and 270 frames
    got = build_prompt(ours, messages, audio_token_counts=audio_counts, image_token_counts=image_counts,
                       video_token_counts=video_counts)
    assert got == want
    swapped = build_prompt(ours, messages, audio_token_counts=audio_counts[::-1], image_token_counts=image_counts,
                           video_token_counts=video_counts)
    assert swapped != want  # order of appearance matters
    assert [len(media_parts(messages, k)) for k in ("audio", "image", "video")] == [2, 1, 1]


@needs_processor
def test_full_checkpoint_dir_prompt(tiny_hf_dir, tiny_hf_dir_legacy):
    """The cached fixture directories (weights + tokenizer + processor settings) read by both sides."""
    for d in (tiny_hf_dir, tiny_hf_dir_legacy):
        ours, proc = Tokenizer.from_dir(d), hf_fixtures.load_hf_processor(d)
        text = proc.apply_chat_template(CONVERSATION, add_generation_prompt=True, tokenize=False)
        assert build_prompt(ours, CONVERSATION) == proc(text=text, return_tensors="np")["input_ids"][0].tolist()
        assert ours.eos_ids == [TINY_TOKENS["im_end"]]
    assert os.path.exists(os.path.join(tiny_hf_dir, "processor_config.json"))
    assert os.path.exists(os.path.join(tiny_hf_dir_legacy, "preprocessor_config.json"))
    assert os.path.exists(os.path.join(tiny_hf_dir_legacy, "chat_template.json"))


def test_build_prompt_count_errors(tiny_tokenizer_dir_factory, tmp_path):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir_factory("v5"))
    messages = _multimodal_messages(tmp_path)
    with pytest.raises(MessagesError, match="2 audio placeholder.*1 audio token count"):
        build_prompt(tok, messages, audio_token_counts=[3], image_token_counts=[4], video_token_counts=[5])
    with pytest.raises(MessagesError, match="image token count 0 must be a positive integer"):
        build_prompt(tok, messages, audio_token_counts=[3, 4], image_token_counts=[0], video_token_counts=[5])
    with pytest.raises(MessagesError, match="audio-in-video"):
        build_prompt(tok, messages, use_audio_in_video=True)
    ids = build_prompt(tok, messages, audio_token_counts=[3, 4], image_token_counts=[2], video_token_counts=[5])
    assert ids.count(TINY_TOKENS["audio_pad"]) == 7 and ids.count(TINY_TOKENS["video_pad"]) == 5


# ---------------------------------------------------------------------------------------------------------------
# Messages files


def test_load_messages_resolves_paths(tmp_path):
    messages = _multimodal_messages(tmp_path)
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    audio = media_parts(messages, "audio")
    assert [p.path for p in audio] == [str(tmp_path / "a1.wav"), str(tmp_path / "a2.wav")]
    assert all(os.path.isabs(p.path) for p in audio)
    video = media_parts(messages, "video")[0]
    assert video.fps == 2.0 and video.to_template() == {"type": "video", "path": str(tmp_path / "clip.mp4"),
                                                         "fps": 2.0}
    assert messages[2].content == "A tone and some noise."


@pytest.mark.parametrize("data, match", [
    ({"role": "user", "content": "hi"}, "must be a JSON list"),
    ([], "empty"),
    (["hi"], "message 0: must be an object"),
    ([{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}], "message 1: unknown role 'robot'"),
    ([{"role": "user"}], "message 0: missing 'content'"),
    ([{"role": "user", "content": 3}], "message 0: 'content' must be a string or a list"),
    ([{"role": "user", "content": [{"type": "smell", "path": "a1.wav"}]}], "message 0, part 0: unknown content part"),
    ([{"role": "user", "content": ["hi"]}], "message 0, part 0: a content part must be an object"),
    ([{"role": "user", "content": [{"type": "text"}]}], "message 0, part 0: a text part needs"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "audio"}]}],
     "message 0, part 1: an audio part needs a string 'path'"),
    ([{"role": "system", "content": "s"}, {"role": "user", "content": [{"type": "image", "path": "missing.png"}]}],
     "message 1, part 0: image file not found: .*missing.png"),
    ([{"role": "user", "content": [{"type": "video", "path": "clip.mp4", "fps": -1}]}],
     "message 0, part 0: video 'fps' must be a positive number"),
    ([{"role": "user", "content": [{"type": "audio", "path": "a1.wav", "fps": 2}]}],
     "message 0, part 0: 'fps' is only meaningful for video"),
])
def test_messages_errors(tmp_path, data, match):
    _write_media(tmp_path)
    path = tmp_path / "m.json"
    path.write_text(json.dumps(data))
    with pytest.raises(MessagesError, match=match):
        load_messages(path)


def test_messages_file_errors(tmp_path):
    with pytest.raises(MessagesError, match="messages file not found"):
        load_messages(tmp_path / "absent.json")
    bad = tmp_path / "bad.json"
    bad.write_text('[{"role": "user", "content": "hi"},')
    with pytest.raises(MessagesError, match="malformed JSON"):
        load_messages(bad)
    assert issubclass(MessagesError, ValueError)


# ---------------------------------------------------------------------------------------------------------------
# Processor settings


def test_processor_settings_both_layouts(tmp_path):
    v5 = load_processor_settings(write_processor_config(tmp_path / "v5", "v5"))
    legacy = load_processor_settings(write_processor_config(tmp_path / "legacy", "legacy"))
    assert v5["layout"] == "v5" and legacy["layout"] == "legacy"
    for section in ("feature_extractor", "image_processor", "video_processor", "processor"):
        assert v5[section] == legacy[section], section
    fe, img, vid = v5["feature_extractor"], v5["image_processor"], v5["video_processor"]
    assert (fe["feature_size"], fe["sampling_rate"], fe["hop_length"], fe["n_fft"], fe["chunk_length"]) == (
        128, 16000, 160, 400, 300)
    assert (img["patch_size"], img["merge_size"], img["temporal_patch_size"]) == (16, 2, 2)
    assert (img["min_pixels"], img["max_pixels"]) == (3136, 12_845_056)
    assert img["image_mean"] == [0.5] * 3 and img["image_std"] == [0.5] * 3
    assert (vid["min_pixels"], vid["max_pixels"]) == (131072, 786432)
    assert v5["processor"]["position_id_per_seconds"] == 13.0
    assert load_processor_settings(tmp_path)["layout"] == "defaults"


def test_processor_settings_read_saved_values(tmp_path):
    d = write_processor_config(tmp_path / "v5", "v5")
    cfg = json.load(open(os.path.join(d, "processor_config.json")))
    cfg["image_processor"]["patch_size"] = 14
    cfg["image_processor"]["size"] = {"shortest_edge": 1000, "longest_edge": 2000}
    cfg["feature_extractor"]["feature_size"] = 80
    cfg["video_processor"]["size"] = {"shortest_edge": 100352, "longest_edge": 602112}
    json.dump(cfg, open(os.path.join(d, "processor_config.json"), "w"))
    s = load_processor_settings(d)
    assert s["image_processor"]["patch_size"] == 14 and s["feature_extractor"]["feature_size"] == 80
    assert (s["image_processor"]["min_pixels"], s["image_processor"]["max_pixels"]) == (1000, 2000)
    # the processor's own per-frame budget wins over a saved video size (checked against HF below)
    assert (s["video_processor"]["min_pixels"], s["video_processor"]["saved_min_pixels"]) == (131072, 100352)
    legacy = write_processor_config(tmp_path / "legacy", "legacy")
    pre = json.load(open(os.path.join(legacy, "preprocessor_config.json")))
    pre["min_pixels"], pre["max_pixels"] = 4096, 8192
    json.dump(pre, open(os.path.join(legacy, "preprocessor_config.json"), "w"))
    s = load_processor_settings(legacy)
    assert (s["image_processor"]["min_pixels"], s["image_processor"]["max_pixels"]) == (4096, 8192)


@needs_processor
def test_video_pixel_budget_is_the_processors(tiny_tokenizer_dir_factory, tmp_path):
    """A saved video `size` does not change the grid: Qwen3OmniMoeProcessor passes its own 131072..786432."""
    d = shutil.copytree(tiny_tokenizer_dir_factory("v5"), tmp_path / "d")
    cfg = json.load(open(d / "processor_config.json"))
    cfg["video_processor"]["size"] = {"shortest_edge": 100352, "longest_edge": 602112}
    json.dump(cfg, open(d / "processor_config.json", "w"))
    proc = hf_fixtures.load_hf_processor(str(d))
    video = (np.random.RandomState(0).rand(2, 64, 64, 3) * 255).astype(np.uint8)
    out = proc(text="<|vision_start|><|video_pad|><|vision_end|>", videos=[video], return_tensors="np")
    side = 384  # smart_resize(64, 64) with min_pixels 131072 -> 384 (100352 would give 320)
    assert out["video_grid_thw"].tolist() == [[1, side // 16, side // 16]]
    assert load_processor_settings(d)["video_processor"]["min_pixels"] == 131072

"""End to end with media in the prompt: omni-jax generate vs transformers' processor + thinker.generate (greedy)."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from hf_fixtures import hf_model_from_dir, load_hf_processor, needs_torchvision

from omni_jax import cli
from omni_jax.config import TINY_TOKENS

pytestmark = needs_torchvision

N_NEW = 20


def _tone(seconds, freq, sr=16000):
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.RandomState(int(freq))
    return (0.4 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 1.3 * t))
            + 0.05 * rng.randn(t.size)).astype(np.float32)


@pytest.fixture(scope="module")
def hf_pair(tiny_hf_dir):
    return hf_model_from_dir(tiny_hf_dir), load_hf_processor(tiny_hf_dir)


def _hf_generate(hf, proc, conversation, audios=None, images=None, videos=None, **kw):
    text = proc.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    inputs = proc(text=text, audio=audios, images=images, videos=videos, return_tensors="pt", padding=True, **kw)
    with torch.no_grad():
        out = hf.thinker.generate(**inputs, max_new_tokens=N_NEW, do_sample=False,
                                  eos_token_id=TINY_TOKENS["im_end"], pad_token_id=0)
    n = inputs["input_ids"].shape[1]
    return inputs["input_ids"][0].tolist(), out[0, n:].tolist()


def _ours(tiny_hf_dir, tmp_path, capsys, messages):
    p = tmp_path / "messages.json"
    p.write_text(json.dumps(messages))
    code = cli.main(["generate", "--model", tiny_hf_dir, "--messages", str(p), "--greedy", "--max-new-tokens",
                     str(N_NEW), "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("seconds", [[1.3], [9.4], [2.2, 0.7]])
def test_audio_prompt_matches_transformers(tiny_hf_dir, hf_pair, tmp_path, capsys, seconds):
    hf, proc = hf_pair
    waves = [_tone(s, 220 + 110 * i) for i, s in enumerate(seconds)]
    parts, conv_parts = [], []
    for i, w in enumerate(waves):
        sf.write(tmp_path / f"a{i}.wav", w, 16000, subtype="FLOAT")
        parts.append({"type": "audio", "path": f"a{i}.wav"})
        conv_parts.append({"type": "audio", "audio": w})
    parts.append({"type": "text", "text": "What do you hear?"})
    conv_parts.append({"type": "text", "text": "What do you hear?"})
    ref_ids, ref_new = _hf_generate(hf, proc, [{"role": "user", "content": conv_parts}], audios=waves)
    ours = _ours(tiny_hf_dir, tmp_path, capsys, [{"role": "user", "content": parts}])
    assert ours["prompt_token_ids"] == ref_ids
    assert ours["token_ids"] == ref_new


def _image(h, w, seed):
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([(xx * 3 + seed * 40) % 256, (yy * 5) % 256, ((xx + yy) * 2) % 256], -1)
    return (img + rng.randint(0, 20, img.shape)).clip(0, 255).astype(np.uint8)


def test_image_prompt_matches_transformers(tiny_hf_dir, hf_pair, tmp_path, capsys):
    from PIL import Image

    hf, proc = hf_pair
    img = _image(64, 96, 1)  # multiples of 32: no resize, so pixels are exact on both sides
    Image.fromarray(img).save(tmp_path / "cat.png")
    conv = [{"role": "user", "content": [{"type": "image", "image": Image.fromarray(img)},
                                         {"type": "text", "text": "Describe the picture."}]}]
    ref_ids, ref_new = _hf_generate(hf, proc, conv, images=[Image.fromarray(img)])
    ours = _ours(tiny_hf_dir, tmp_path, capsys, [{"role": "user", "content": [
        {"type": "image", "path": "cat.png"}, {"type": "text", "text": "Describe the picture."}]}])
    assert ours["prompt_token_ids"] == ref_ids
    assert ours["token_ids"] == ref_new


def test_video_npy_and_audio_with_image_match_transformers(tiny_hf_dir, hf_pair, tmp_path, capsys):
    """A .npy video at fps 2.0, then audio + image in one turn (several encoders, DeepStack, TM-RoPE)."""
    from PIL import Image

    hf, proc = hf_pair
    frames = np.stack([_image(288, 480, s) for s in range(4)])  # within the per-frame pixel budget: no resize
    np.save(tmp_path / "clip.npy", frames)
    conv = [{"role": "user", "content": [{"type": "video", "video": list(frames)},
                                         {"type": "text", "text": "What happens?"}]}]
    ref_ids, ref_new = _hf_generate(hf, proc, conv, videos=[list(frames)], fps=2.0)
    ours = _ours(tiny_hf_dir, tmp_path, capsys, [{"role": "user", "content": [
        {"type": "video", "path": "clip.npy", "fps": 2.0}, {"type": "text", "text": "What happens?"}]}])
    assert ours["prompt_token_ids"] == ref_ids
    assert ours["token_ids"] == ref_new

    wave = _tone(2.5, 330)
    sf.write(tmp_path / "a.wav", wave, 16000, subtype="FLOAT")
    img = _image(96, 64, 2)
    Image.fromarray(img).save(tmp_path / "b.png")
    conv = [{"role": "user", "content": [{"type": "audio", "audio": wave}, {"type": "image", "image": "x"},
                                         {"type": "text", "text": "Match them."}]}]
    ref_ids, ref_new = _hf_generate(hf, proc, conv, audios=[wave], images=[Image.fromarray(img)])
    ours = _ours(tiny_hf_dir, tmp_path, capsys, [{"role": "user", "content": [
        {"type": "audio", "path": "a.wav"}, {"type": "image", "path": "b.png"},
        {"type": "text", "text": "Match them."}]}])
    assert ours["prompt_token_ids"] == ref_ids
    assert ours["token_ids"] == ref_new


def test_long_media_prompt_exceeding_context_fails_before_encoding(tiny_hf_dir, tmp_path, capsys):
    sf.write(tmp_path / "a.wav", _tone(3.0, 440), 16000, subtype="FLOAT")
    (tmp_path / "m.json").write_text(json.dumps([{"role": "user", "content": [{"type": "audio", "path": "a.wav"}]}]))
    code = cli.main(["generate", "--model", tiny_hf_dir, "--messages", str(tmp_path / "m.json"),
                     "--max-new-tokens", "4060"])
    _, err = capsys.readouterr()
    assert code == 2 and "prompt (after media placeholders) of" in err and "exceeds the model's context of 4096" in err

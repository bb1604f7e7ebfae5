"""Video containers (PyAV), audio-in-video and `--use-audio-in-video`: frame sampling, audio extraction, prompt
layout and end-to-end greedy generation against transformers' processor + thinker.generate."""

import json
import math
from fractions import Fraction

import av
import numpy as np
import pytest
import soundfile as sf
import torch
from hf_fixtures import hf_model_from_dir, load_hf_processor, needs_torchvision

from omni_jax import cli
from omni_jax.checkpoint.hf import load_config
from omni_jax.config import TINY_TOKENS
from omni_jax.processing import chat
from omni_jax.processing.audio import load_audio
from omni_jax.processing.chat import MessagesError, VideoAudio, audio_in_video_order, load_messages
from omni_jax.processing.tokenizer import Tokenizer
from omni_jax.processing.video import (
    NoAudioStreamError,
    VideoError,
    load_video,
    load_video_audio,
    sample_frame_indices,
)
from omni_jax.prompt import PromptError, check_placeholder_counts, prepare_thinker_prompt

needs_hf_processor = needs_torchvision
N_NEW = 20
H, W = 288, 480  # inside the per-frame pixel budget and multiples of 32: no resize on either side


# ---------------------------------------------------------------------------------------------------------------
# Media


def _frames(n, seed=0, h=H, w=W):
    rng = np.random.RandomState(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    out = []
    for i in range(n):
        img = np.stack([(xx * 3 + i * 37 + seed * 11) % 256, (yy * 5 + i * 19) % 256, ((xx + yy) * 2 + i * 7) % 256],
                       -1)
        out.append((img + rng.randint(0, 24, img.shape)).clip(0, 255).astype(np.uint8))
    return np.stack(out)


def _tone(seconds, freq, sr=16000, channels=1):
    t = np.arange(int(round(seconds * sr))) / sr
    x = 0.4 * np.sin(2 * np.pi * freq * t) * (1 + 0.5 * np.sin(2 * np.pi * 1.3 * t))
    return np.stack([x * (1 - 0.3 * c) for c in range(channels)])  # [C, N] float64 in [-0.6, 0.6]


def write_video(path, frames, fps, *, codec="ffv1", audio=None, audio_rate=16000, audio_codec="pcm_s16le"):
    """Encode uint8 frames [T, H, W, 3] (and optionally float audio [C, N]) with PyAV.

    ffv1 with pix_fmt bgr0 is lossless RGB: decoding gives back the exact frames. Audio is written as int16.
    Returns the int16 audio written ([C, N]) or None.
    """
    written = None
    with av.open(str(path), "w") as c:
        vs = c.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        vs.width, vs.height = frames.shape[2], frames.shape[1]
        vs.pix_fmt = "bgr0" if codec == "ffv1" else "yuv420p"
        if codec == "mpeg4":
            vs.bit_rate = 20_000_000
        if audio is not None:
            layout = {1: "mono", 2: "stereo"}[audio.shape[0]]
            fmt = "s16" if audio_codec == "pcm_s16le" else "flt"  # both packed (interleaved)
            ast = c.add_stream(audio_codec, rate=audio_rate, layout=layout)
            ast.format = fmt
        for f in frames:
            for p in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        if audio is not None:
            ch = audio.shape[0]
            if fmt == "s16":
                written = np.round(audio * 32767).astype(np.int16)
                data = written.T.reshape(-1)
            else:
                data = audio.astype(np.float32).T.reshape(-1)
            hop = 1024 if fmt == "s16" else ast.codec_context.frame_size
            for i in range(0, audio.shape[1], hop):
                chunk = data[i * ch:(i + hop) * ch]
                if fmt != "s16" and chunk.size < hop * ch:  # the encoder takes whole frames only
                    chunk = np.pad(chunk, (0, hop * ch - chunk.size))
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(chunk[None]), format=fmt, layout=layout)
                af.sample_rate, af.pts = audio_rate, i
                for p in ast.encode(af):
                    c.mux(p)
            for p in ast.encode():
                c.mux(p)
    return written


def _empty_video(path):
    """An mkv with a video stream that has no frames (only audio packets, so the file is valid)."""
    with av.open(str(path), "w") as c:
        vs = c.add_stream("ffv1", rate=2)
        vs.width, vs.height, vs.pix_fmt = W, H, "bgr0"
        ast = c.add_stream("pcm_s16le", rate=16000, layout="mono")
        af = av.AudioFrame.from_ndarray(np.zeros((1, 1600), np.int16), format="s16", layout="mono")
        af.sample_rate, af.pts = 16000, 0
        for p in [*ast.encode(af), *ast.encode()]:
            c.mux(p)


# ---------------------------------------------------------------------------------------------------------------
# Decoding and sampling (no reference model)


def test_container_frames_and_sampling(tmp_path):
    frames = _frames(8, seed=1)
    write_video(tmp_path / "v.mkv", frames, 2)
    got, fps = load_video(tmp_path / "v.mkv", 2.0)  # 8 frames at 2 fps sampled at 2 fps: all of them, exactly
    assert fps == 2.0 and got.dtype == np.uint8 and np.array_equal(got, frames)
    got, fps = load_video(tmp_path / "v.mkv")  # default: min(2, source fps)
    assert fps == 2.0 and np.array_equal(got, frames)
    got, fps = load_video(tmp_path / "v.mkv", 1.0)  # 4 s at 1 fps -> 4 frames, indices 0, 2, 4, 6
    assert fps == 1.0 and np.array_equal(got, frames[[0, 2, 4, 6]])
    got, fps = load_video(tmp_path / "v.mkv", 0.25)  # 1 frame wanted: the 4-frame minimum binds
    assert fps == 0.25 and np.array_equal(got, frames[[0, 2, 4, 6]])

    write_video(tmp_path / "fast.mkv", _frames(30, seed=2, h=64, w=96), 30)  # default caps at 2 fps
    got, fps = load_video(tmp_path / "fast.mkv")
    assert fps == 2.0 and got.shape == (4, 64, 96, 3)  # 1 s at 2 fps = 2 frames, raised to the minimum of 4

    np.save(tmp_path / "v.npy", frames[:3])  # .npy: every frame, fps = the given rate (default 1.0)
    got, fps = load_video(tmp_path / "v.npy")
    assert fps == 1.0 and np.array_equal(got, frames[:3])
    assert load_video(tmp_path / "v.npy", 3)[1] == 3.0


@pytest.mark.parametrize("codec,ext", [("mpeg4", "mp4"), ("libvpx-vp9", "webm")])
def test_lossy_containers_decode(tmp_path, codec, ext):
    frames = _frames(6, seed=3)
    write_video(tmp_path / f"v.{ext}", frames, 2, codec=codec)
    got, fps = load_video(tmp_path / f"v.{ext}", 2.0)
    assert got.shape == frames.shape and fps == 2.0
    err = np.abs(got.astype(np.int32) - frames).mean()
    assert err < 12, err  # lossy 4:2:0 codecs: close, not exact


def test_sample_frame_indices_rule():
    # torch.arange(0, 30, 30 / 26) has 27 elements; float32 truncation decides each index.
    assert sample_frame_indices(30, 30.0, 26.0).tolist() == torch.arange(0, 30, 30 / 26).int().tolist()
    assert len(sample_frame_indices(30, 30.0, 26.0)) == 27
    assert sample_frame_indices(1, 30.0, 2.0).tolist() == [0]  # fewer frames than a temporal patch: keep all
    assert sample_frame_indices(2000, 30.0, 30.0).size == 768  # max_frames
    with pytest.raises(VideoError, match="zero frames"):
        sample_frame_indices(0, 30.0, 2.0)


@needs_hf_processor
def test_sample_frame_indices_match_reference():
    from transformers.video_utils import VideoMetadata

    vp = _hf_video_processor()
    rng = np.random.RandomState(0)
    cases = [(7, 2.0, 2.0), (30, 30.0, 26.0), (300, 30.0, 2.0), (301, 29.97, 1.0), (2000, 30.0, 30.0), (9, 25.0, 1.0),
             (49, 10.0, 9.0)] + [(int(rng.randint(2, 3000)), float(rng.choice([23.976, 24, 25, 29.97, 30, 60])),
                                  float(rng.uniform(0.1, 8))) for _ in range(60)]
    for total, src, fps in cases:
        ref = vp.sample_frames(VideoMetadata(total_num_frames=total, fps=src), fps=fps, min_frames=4,
                               max_frames=768, temporal_patch_size=2)
        assert sample_frame_indices(total, src, fps).tolist() == ref.tolist(), (total, src, fps)


def _hf_video_processor():
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    return Qwen2VLVideoProcessor()


def test_audio_track_extraction(tmp_path):
    frames = _frames(4, seed=4, h=64, w=96)
    # 16 kHz mono int16: the extracted samples are exactly int16 / 32768.
    pcm = write_video(tmp_path / "a.mkv", frames, 2, audio=_tone(2.3, 440))
    wav = load_video_audio(tmp_path / "a.mkv")
    assert wav.dtype == np.float32 and np.array_equal(wav, pcm[0] / np.float32(32768))
    # 44.1 kHz stereo: mono by channel average, then the same resampler as audio files (bit-identical to
    # load_audio on a WAV holding the same samples).
    pcm = write_video(tmp_path / "b.mkv", frames, 2, audio=_tone(1.7, 300, sr=44100, channels=2), audio_rate=44100)
    sf.write(tmp_path / "b.wav", pcm.T, 44100, subtype="PCM_16")
    wav = load_video_audio(tmp_path / "b.mkv")
    np.testing.assert_array_equal(wav, load_audio(tmp_path / "b.wav"))
    assert abs(wav.shape[0] - round(1.7 * 16000)) <= 1
    # webm (vp9 + Opus 48 kHz stereo, lossy): right length and content.
    write_video(tmp_path / "c.webm", frames, 2, codec="libvpx-vp9", audio=_tone(2.0, 440, sr=48000, channels=2),
                audio_rate=48000, audio_codec="libopus")
    wav = load_video_audio(tmp_path / "c.webm")
    ref = _tone(2.0, 440, channels=2).mean(0)
    assert abs(wav.shape[0] - ref.shape[0]) < 0.05 * 16000
    n = min(wav.shape[0], ref.shape[0]) - 2000
    lag = int(np.argmax([np.dot(wav[s:s + n], ref[:n]) for s in range(0, 800)]))  # codec delay
    corr = np.corrcoef(wav[lag:lag + n], ref[:n])[0, 1]
    assert corr > 0.95, corr


# ---------------------------------------------------------------------------------------------------------------
# Audio-in-video layout


def test_audio_in_video_order_spec_example():
    """Spec §3 example: 39 audio tokens, grid (3, 4, 4), second_per_grid 2.0, 13 positions/s:
    V x4, A x26, V x4, A x13, V x4 (video first on ties)."""
    order = audio_in_video_order(VideoAudio((3, 4, 4), 2.0, 39))
    runs, prev = [], None
    for v in order:
        if v == prev:
            runs[-1][1] += 1
        else:
            runs.append([bool(v), 1])
            prev = v
    assert runs == [[True, 4], [False, 26], [True, 4], [False, 13], [True, 4]]


def test_audio_in_video_order_matches_reference_rule():
    """Against the processor's two-pointer merge (written out here from the spec, §8.4) for random layouts."""
    rng = np.random.RandomState(1)
    for _ in range(200):
        t, h, w = int(rng.randint(1, 6)), 2 * int(rng.randint(1, 4)), 2 * int(rng.randint(1, 4))
        spg, n_audio = 2 / float(rng.choice([0.5, 1, 2, 3, 7, 2.5])), int(rng.randint(1, 150))
        v_time = np.repeat(np.arange(t) * spg * 13.0, h * w // 4)
        want, i, j = [], 0, 0
        while i < len(v_time) and j < n_audio:
            if v_time[i] <= j:
                want.append(True)
                i += 1
            else:
                want.append(False)
                j += 1
        want += [True] * (len(v_time) - i) + [False] * (n_audio - j)
        assert audio_in_video_order(VideoAudio((t, h, w), spg, n_audio)).tolist() == want


def test_build_prompt_audio_in_video_errors(tiny_tokenizer_dir_factory, tmp_path):
    tok = Tokenizer.from_dir(tiny_tokenizer_dir_factory("v5"))
    np.save(tmp_path / "v.npy", _frames(2, h=64, w=64))
    messages = chat.parse_messages([{"role": "user", "content": [{"type": "video", "path": "v.npy"}]}], tmp_path)
    with pytest.raises(MessagesError, match="1 video placeholder.*0 video/audio layout"):
        chat.build_prompt(tok, messages, use_audio_in_video=True)
    with pytest.raises(MessagesError, match="audio token count must be a positive integer"):
        chat.build_prompt(tok, messages, use_audio_in_video=True, video_audio=[VideoAudio((1, 4, 4), 2.0, 0)])
    with pytest.raises(MessagesError, match="not divisible by the merge size"):
        chat.build_prompt(tok, messages, use_audio_in_video=True, video_audio=[VideoAudio((1, 3, 4), 2.0, 5)])
    with pytest.raises(MessagesError, match="disagree with the video grids"):
        chat.build_prompt(tok, messages, use_audio_in_video=True, video_audio=[VideoAudio((1, 4, 4), 2.0, 5)],
                          video_token_counts=[3])
    ids = chat.build_prompt(tok, messages, use_audio_in_video=True, video_audio=[VideoAudio((2, 4, 4), 1.0, 20)])
    t = TINY_TOKENS
    i = ids.index(t["vision_start"])
    assert ids[i + 1] == t["audio_start"] and ids[i + 1 + 4 + 20 + 4 + 1] == t["audio_end"]
    assert ids[i + 2 + 4 + 20 + 4 + 1] == t["vision_end"]
    assert ids[i + 2:i + 2 + 4] == [t["video_pad"]] * 4 and ids[i + 6:i + 6 + 13] == [t["audio_pad"]] * 13


# ---------------------------------------------------------------------------------------------------------------
# Against transformers


@pytest.fixture(scope="module")
def hf_pair(tiny_hf_dir):
    return hf_model_from_dir(tiny_hf_dir), load_hf_processor(tiny_hf_dir)


def _hf_inputs(proc, conversation, *, videos=None, audios=None, audio_from_video=None, fps=None):
    text = proc.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    kw = {} if fps is None else {"fps": fps}
    if audio_from_video is not None:
        kw.update(load_audio_from_video=True, audio_from_video_indices=audio_from_video)
    return proc(text=text, audio=audios, videos=videos, return_tensors="pt", padding=True, **kw)


def _hf_generate(hf, inputs, use_audio_in_video):
    with torch.no_grad():
        out = hf.thinker.generate(**inputs, max_new_tokens=N_NEW, do_sample=False,
                                  use_audio_in_video=use_audio_in_video, eos_token_id=TINY_TOKENS["im_end"],
                                  pad_token_id=0)
    n = inputs["input_ids"].shape[1]
    return inputs["input_ids"][0].tolist(), out[0, n:].tolist()


def _ours(model_dir, tmp_path, capsys, messages, *extra):
    p = tmp_path / "messages.json"
    p.write_text(json.dumps(messages))
    code = cli.main(["generate", "--model", model_dir, "--messages", str(p), "--greedy", "--max-new-tokens",
                     str(N_NEW), "--json", *extra])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _av_clip(tmp_path, name, n_frames, fps, seconds, seed):
    frames = _frames(n_frames, seed=seed)
    write_video(tmp_path / name, frames, fps, audio=_tone(seconds, 220 + 40 * seed))
    return frames


@needs_hf_processor
@pytest.mark.parametrize("n_frames,src_fps,fps,seconds", [(8, 2, 2.0, 3.1), (8, 2, 1.0, 4.0), (6, 3, 3.0, 1.45)])
def test_audio_in_video_prompt_matches_hf_processor(tiny_hf_dir, hf_pair, tmp_path, n_frames, src_fps, fps,
                                                    seconds):
    """Prompt ids and TM-RoPE positions of [audio part, video with its audio, image, text] with
    use_audio_in_video, given the same frames / waveforms / fps on both sides."""
    from PIL import Image

    hf, proc = hf_pair
    _av_clip(tmp_path, "clip.mkv", n_frames, src_fps, seconds, seed=1)
    lone = _tone(1.3, 500)[0].astype(np.float32)
    sf.write(tmp_path / "lone.wav", lone, 16000, subtype="FLOAT")
    img = _frames(1, seed=9, h=64, w=96)[0]
    Image.fromarray(img).save(tmp_path / "img.png")
    data = [{"role": "user", "content": [{"type": "audio", "path": "lone.wav"},
                                         {"type": "video", "path": "clip.mkv", "fps": fps},
                                         {"type": "image", "path": "img.png"},
                                         {"type": "text", "text": "What happens?"}]}]
    (tmp_path / "m.json").write_text(json.dumps(data))
    messages = load_messages(tmp_path / "m.json")
    ours = prepare_thinker_prompt(Tokenizer.from_dir(tiny_hf_dir), load_config(tiny_hf_dir), messages,
                                  use_audio_in_video=True)

    frames, fps_used = load_video(tmp_path / "clip.mkv", fps)
    track = load_video_audio(tmp_path / "clip.mkv")
    conv = [{"role": "user", "content": [{"type": "audio", "audio": lone}, {"type": "video", "video": list(frames)},
                                         {"type": "image", "image": Image.fromarray(img)},
                                         {"type": "text", "text": "What happens?"}]}]
    text = proc.apply_chat_template(conv, add_generation_prompt=True, tokenize=False)
    inputs = proc(text=text, audio=[lone, track], videos=[list(frames)], images=[Image.fromarray(img)],
                  load_audio_from_video=True, audio_from_video_indices=[None, 0], fps=fps_used,
                  return_tensors="pt", padding=True)
    ids = inputs["input_ids"][0].tolist()
    assert ours.input_ids == ids
    assert ids.count(TINY_TOKENS["audio_start"]) == 2 and ids.count(TINY_TOKENS["vision_start"]) == 2
    np.testing.assert_array_equal(np.float32(ours.video_second_per_grid), inputs["video_second_per_grid"].numpy())
    # Audio inputs in the reference's order (audio part, then the video's track). HF's float32 STFT vs our
    # float64 one differ by up to ~6e-5 (measured 6.4e-5; see test_audio_features); different audios by O(1).
    np.testing.assert_allclose(ours.audio[0], inputs["input_features"].numpy(), rtol=0, atol=2e-4)
    np.testing.assert_array_equal(ours.audio[1], inputs["feature_attention_mask"].sum(-1).numpy())
    np.testing.assert_allclose(ours.video[0], inputs["pixel_values_videos"].numpy(), rtol=0, atol=1e-6)
    pos, delta = hf.thinker.get_rope_index(
        inputs["input_ids"], inputs["image_grid_thw"], inputs["video_grid_thw"], inputs["attention_mask"], True,
        inputs["feature_attention_mask"].sum(-1), inputs["video_second_per_grid"])
    np.testing.assert_array_equal(ours.positions, pos[:, 0].numpy())
    assert ours.delta == float(delta[0, 0])


@needs_hf_processor
def test_audio_in_video_generate_matches_transformers(tiny_hf_dir, hf_pair, tmp_path, capsys):
    """`omni-jax generate --use-audio-in-video` vs processor(load_audio_from_video) + thinker.generate(
    use_audio_in_video=True): an audio part before a video with an audio track (audio order), greedy."""
    hf, proc = hf_pair
    _av_clip(tmp_path, "clip.mkv", 8, 2, 3.1, seed=2)
    lone = _tone(0.9, 610)[0].astype(np.float32)
    sf.write(tmp_path / "lone.wav", lone, 16000, subtype="FLOAT")
    frames, fps = load_video(tmp_path / "clip.mkv")  # default sampling: 2 fps here
    track = load_video_audio(tmp_path / "clip.mkv")
    conv = [{"role": "user", "content": [{"type": "audio", "audio": lone}, {"type": "video", "video": list(frames)},
                                         {"type": "text", "text": "What happens?"}]}]
    inputs = _hf_inputs(proc, conv, videos=[list(frames)], audios=[lone, track], audio_from_video=[None, 0], fps=fps)
    ref_ids, ref_new = _hf_generate(hf, inputs, True)
    ours = _ours(tiny_hf_dir, tmp_path, capsys, [{"role": "user", "content": [
        {"type": "audio", "path": "lone.wav"}, {"type": "video", "path": "clip.mkv"},
        {"type": "text", "text": "What happens?"}]}], "--use-audio-in-video")
    assert ours["prompt_token_ids"] == ref_ids
    assert ours["token_ids"] == ref_new
    assert ref_ids[ref_ids.index(TINY_TOKENS["vision_start"]) + 1] == TINY_TOKENS["audio_start"]
    assert len(ref_new) > 3


@needs_hf_processor
def test_container_video_matches_transformers(tiny_hf_dir, hf_pair, tmp_path, capsys):
    """An mp4 (mpeg4) video sampled at 1 fps from 2 fps, without audio-in-video: HF gets the frames we decode."""
    hf, proc = hf_pair
    write_video(tmp_path / "clip.mp4", _frames(8, seed=5), 2, codec="mpeg4", audio=_tone(4.0, 330))
    frames, fps = load_video(tmp_path / "clip.mp4", 1.0)
    assert frames.shape[0] == 4 and fps == 1.0
    conv = [{"role": "user", "content": [{"type": "video", "video": list(frames)},
                                         {"type": "text", "text": "Describe it."}]}]
    ref_ids, ref_new = _hf_generate(hf, _hf_inputs(proc, conv, videos=[list(frames)], fps=fps), False)
    ours = _ours(tiny_hf_dir, tmp_path, capsys, [{"role": "user", "content": [
        {"type": "video", "path": "clip.mp4", "fps": 1.0}, {"type": "text", "text": "Describe it."}]}])
    assert ours["prompt_token_ids"] == ref_ids
    assert ours["token_ids"] == ref_new


# ---------------------------------------------------------------------------------------------------------------
# Bad inputs


def test_video_errors(tmp_path):
    (tmp_path / "junk.mp4").write_bytes(b"this is not a video container" * 100)
    with pytest.raises(VideoError, match="cannot read video file.*not a readable media container"):
        load_video(tmp_path / "junk.mp4")
    (tmp_path / "empty.mp4").write_bytes(b"")
    with pytest.raises(VideoError, match="empty"):
        load_video(tmp_path / "empty.mp4")
    with pytest.raises(VideoError, match="not found"):
        load_video(tmp_path / "missing.mp4")
    _empty_video(tmp_path / "zero.mkv")
    with pytest.raises(VideoError, match="zero frames"):
        load_video(tmp_path / "zero.mkv")
    np.save(tmp_path / "zero.npy", np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(VideoError, match="zero frames"):
        load_video(tmp_path / "zero.npy")
    sf.write(tmp_path / "sound.wav", _tone(0.5, 440)[0], 16000)
    with pytest.raises(VideoError, match="no video stream"):
        load_video(tmp_path / "sound.wav")
    write_video(tmp_path / "silent.mkv", _frames(4, h=64, w=96), 2)
    for bad in (0, -1.0, float("nan"), float("inf"), True, "2"):
        with pytest.raises(VideoError, match="fps must be a positive number"):
            load_video(tmp_path / "silent.mkv", bad)
    with pytest.raises(NoAudioStreamError, match="no audio stream"):
        load_video_audio(tmp_path / "silent.mkv")
    np.save(tmp_path / "v.npy", _frames(2, h=64, w=64))
    with pytest.raises(NoAudioStreamError, match="no audio stream"):
        load_video_audio(tmp_path / "v.npy")
    assert all(issubclass(e, ValueError) for e in (VideoError, NoAudioStreamError))


def test_cli_errors(tiny_hf_dir, tmp_path, capsys):
    write_video(tmp_path / "silent.mkv", _frames(4, h=64, w=96), 2)
    (tmp_path / "junk.mkv").write_bytes(b"\x1a\x45\xdf\xa3garbage" * 50)
    _empty_video(tmp_path / "zero.mkv")
    cases = [("silent.mkv", None, ["--use-audio-in-video"], "has no audio stream"),
             ("junk.mkv", None, [], "cannot read video file"),
             ("zero.mkv", None, [], "zero frames"),
             ("silent.mkv", 0, [], "video 'fps' must be a positive number")]
    for name, fps, extra, msg in cases:
        part = {"type": "video", "path": name}
        if fps is not None:
            part["fps"] = fps
        p = tmp_path / "m.json"
        p.write_text(json.dumps([{"role": "user", "content": [part, {"type": "text", "text": "hi"}]}]))
        code = cli.main(["generate", "--model", tiny_hf_dir, "--messages", str(p), "--greedy", "--max-new-tokens",
                         "2", *extra])
        out, err = capsys.readouterr()
        assert code == 2 and msg in err and "Traceback" not in err, (name, err)


def test_placeholder_count_mismatch(tiny_hf_dir, tmp_path):
    _av_clip(tmp_path, "clip.mkv", 4, 2, 2.0, seed=3)
    (tmp_path / "m.json").write_text(json.dumps([{"role": "user", "content": [
        {"type": "video", "path": "clip.mkv"}, {"type": "text", "text": "hi"}]}]))
    cfg = load_config(tiny_hf_dir)
    p = prepare_thinker_prompt(Tokenizer.from_dir(tiny_hf_dir), cfg, load_messages(tmp_path / "m.json"),
                               use_audio_in_video=True)
    n_audio = p.input_ids.count(TINY_TOKENS["audio_pad"])
    n_video = p.input_ids.count(TINY_TOKENS["video_pad"])
    assert n_audio == 26 and n_video == 2 * 135  # 2 s of audio; 4 frames -> grid (2, 18, 30)
    check_placeholder_counts(p.input_ids, cfg, audio_tokens=n_audio, video_tokens=n_video)
    with pytest.raises(PromptError, match="audio placeholder/feature count mismatch.*26 audio tokens.*25 rows"):
        check_placeholder_counts(p.input_ids, cfg, audio_tokens=25, video_tokens=n_video)
    with pytest.raises(PromptError, match="video placeholder/feature count mismatch"):
        check_placeholder_counts(p.input_ids, cfg, audio_tokens=n_audio, video_tokens=n_video + 135)
    assert math.isclose(p.video_second_per_grid[0], 1.0)

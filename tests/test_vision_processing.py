"""Image / video preprocessing against transformers' Qwen2-VL image processor (PIL backend), and bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from omni_jax.processing.vision import (
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    VisionInputError,
    load_video_npy,
    preprocess_image,
    preprocess_images,
    preprocess_video,
    smart_resize,
)

P = 16


def _hf_processor(min_pixels=3136, max_pixels=12_845_056):
    # The released preprocessor_config values; torchvision (the default backend) is not importable here.
    return Qwen2VLImageProcessorPil(patch_size=P, temporal_patch_size=2, merge_size=2, min_pixels=min_pixels,
                                    max_pixels=max_pixels, image_mean=[0.5] * 3, image_std=[0.5] * 3)


def _hf(img, **kw):
    out = _hf_processor(**kw)(images=[img])
    return out["pixel_values"], tuple(int(v) for v in out["image_grid_thw"][0])


def _noise(h, w, seed=0, c=3):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def _smooth(h, w):
    y, x = np.mgrid[:h, :w]
    g = (np.sin(x / 7.0) + np.cos(y / 5.0)) * 60 + 128
    return np.stack([g, 255 - g, 128 + 60 * np.sin((x + y) / 9.0)], -1).clip(0, 255).astype(np.uint8)


def test_no_resize_is_exact_and_in_merge_block_order():
    arr = _noise(64, 96)
    got, grid = preprocess_image(Image.fromarray(arr))
    want, want_grid = _hf(Image.fromarray(arr))
    assert grid == want_grid == (1, 4, 6)
    np.testing.assert_array_equal(got, want)
    # Independent check of the layout: patch 1 is block (0,0), in-block (0,1) -> pixel rows 0..15, cols 16..31,
    # vector (C, T, P, P) with both T copies equal; patch 4 is block (0,1), in-block (0,0) -> cols 32..47.
    x = (arr.astype(np.float32) / 255 - 0.5) / 0.5
    v = got.reshape(-1, 3, 2, P, P)
    np.testing.assert_allclose(v[1, :, 0], x[0:16, 16:32].transpose(2, 0, 1), atol=1e-6)
    np.testing.assert_array_equal(v[:, :, 0], v[:, :, 1])
    np.testing.assert_allclose(v[4, :, 1], x[0:16, 32:48].transpose(2, 0, 1), atol=1e-6)
    np.testing.assert_allclose(v[8, :, 0], x[0:16, 64:80].transpose(2, 0, 1), atol=1e-6)  # block (0, 2)
    np.testing.assert_allclose(v[14, :, 0], x[48:64, 0:16].transpose(2, 0, 1), atol=1e-6)  # block (1, 0), (1, 0)


@pytest.mark.parametrize("hw", [(100, 73), (37, 300), (500, 20), (30, 30), (700, 650)])
def test_resize_matches_pil_backend_exactly(hw):
    """Same grid and bit-identical pixels as Qwen2VLImageProcessorPil (resize below min / above max included;
    max_pixels lowered so the downscale branch runs on a small image)."""
    arr = _noise(*hw, seed=hw[0])
    got, grid = preprocess_image(arr, max_pixels=200_000)
    want, want_grid = _hf(Image.fromarray(arr), max_pixels=200_000)
    assert grid == want_grid
    np.testing.assert_array_equal(got, want)


def test_resize_vs_torch_antialiased_bicubic():
    """The torchvision backend resizes with torch's antialiased bicubic, not Pillow's. Emulating it (float resize,
    round, clamp), the grid is identical and pixels differ by a few uint8 levels: measured on this smooth image
    max 2 levels, mean 0.2 levels (noise images: max ~25, mean 0.27)."""
    arr = _smooth(100, 73)
    got, grid = preprocess_image(arr)
    th, tw = grid[1] * P, grid[2] * P
    t = torch.from_numpy(arr).permute(2, 0, 1)[None].float()
    r = torch.nn.functional.interpolate(t, size=(th, tw), mode="bicubic", antialias=True, align_corners=False)
    r = r.clamp(0, 255).round().to(torch.uint8)[0].permute(1, 2, 0).numpy()
    ref, ref_grid = preprocess_image(Image.fromarray(r).resize((tw, th)))  # already the target size: no resize
    assert ref_grid == grid
    levels = np.abs(got - ref) * 127.5
    assert levels.max() <= 3 and levels.mean() < 0.3, (levels.max(), levels.mean())


@pytest.mark.parametrize("mode", ["RGBA", "LA", "L", "P"])
def test_modes_and_transparency_match(mode):
    arr = _noise(64, 64, seed=3, c=4)
    img = Image.fromarray(arr, "RGBA").convert(mode)
    got, grid = preprocess_image(img)
    want, want_grid = _hf(img)
    assert grid == want_grid
    np.testing.assert_array_equal(got, want)


def test_path_input_and_batch(tmp_path):
    arr = _noise(64, 96, seed=5)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    a, ga = preprocess_image(path)
    b, gb = preprocess_image(arr)
    np.testing.assert_array_equal(a, b)
    pix, grids = preprocess_images([str(path), _noise(64, 128)])
    assert grids == [ga, (1, 4, 8)] and pix.shape == (24 + 32, 3 * 2 * P * P)


def _frame_patches(frame, **kw):
    """Per-frame patches from the HF image processor, reshaped to (N, C, T, P, P), one temporal copy."""
    pv, grid = _hf(Image.fromarray(frame), **kw)
    return pv.reshape(-1, 3, 2, P, P)[:, :, 0], grid


@pytest.mark.parametrize("n_frames", [2, 5])
def test_video_matches_image_processor_math(n_frames):
    """288x480 frames need no resize. Each temporal patch = (frame 2k, frame 2k+1) stacked on the T axis; an odd
    frame count repeats the last frame; patches ordered (grid_t, block_row, block_col, in_row, in_col)."""
    frames = np.stack([_noise(288, 480, seed=10 + i) for i in range(n_frames)])
    got, grid, spg = preprocess_video(frames, fps=2.0)
    per = [_frame_patches(f, min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS) for f in frames]
    per += [per[-1]] * (n_frames % 2)
    gt = len(per) // 2
    assert grid == (gt, 18, 30) and spg == 1.0
    want = np.concatenate([np.stack([per[2 * k][0], per[2 * k + 1][0]], axis=2) for k in range(gt)])
    np.testing.assert_array_equal(got, want.reshape(got.shape))


def test_video_per_frame_budget_upscales_small_frames():
    frames = np.stack([_noise(64, 96, seed=20), _noise(64, 96, seed=21)])
    got, grid, spg = preprocess_video(frames, fps=1.0)
    f0, g0 = _frame_patches(frames[0], min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS)
    f1, _ = _frame_patches(frames[1], min_pixels=VIDEO_MIN_PIXELS, max_pixels=VIDEO_MAX_PIXELS)
    assert grid == g0 and grid[1] * grid[2] * P * P >= VIDEO_MIN_PIXELS and spg == 2.0
    np.testing.assert_array_equal(got, np.stack([f0, f1], axis=2).reshape(got.shape))


def test_load_video_npy(tmp_path):
    frames = _noise(32, 64, c=3)[None].repeat(3, 0)
    np.save(tmp_path / "v.npy", frames)
    np.testing.assert_array_equal(load_video_npy(tmp_path / "v.npy"), frames)
    np.save(tmp_path / "bad.npy", frames.astype(np.float32))
    with pytest.raises(VisionInputError, match="uint8"):
        load_video_npy(tmp_path / "bad.npy")
    with pytest.raises(VisionInputError, match="cannot read"):
        load_video_npy(tmp_path / "missing.npy")


def test_smart_resize_reference_values():
    assert smart_resize(64, 96) == (64, 96)
    assert smart_resize(100, 73) == (96, 64)  # round half to even: 73/32 = 2.28 -> 2
    assert smart_resize(10, 10) == (64, 64)  # below min_pixels: scaled up
    h, w = smart_resize(10000, 8000)
    assert h * w <= 12_845_056 and h % 32 == 0 and w % 32 == 0


def test_bad_inputs_raise(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(VisionInputError, match="cannot read image file"):
        preprocess_image(bad)
    with pytest.raises(VisionInputError, match="cannot read image file"):
        preprocess_image(tmp_path / "missing.jpg")
    with pytest.raises(VisionInputError, match="aspect ratio"):
        preprocess_image(_noise(2, 500))
    with pytest.raises(VisionInputError, match="aspect ratio"):
        smart_resize(1, 201)
    with pytest.raises(VisionInputError, match="zero frames"):
        preprocess_video(np.zeros((0, 64, 64, 3), np.uint8), fps=1.0)
    for fps in (0, -1.0, float("nan"), "2"):
        with pytest.raises(VisionInputError, match="fps"):
            preprocess_video(np.zeros((2, 64, 64, 3), np.uint8), fps=fps)
    with pytest.raises(VisionInputError, match="uint8"):
        preprocess_video(np.zeros((2, 64, 64, 3), np.float32), fps=1.0)
    with pytest.raises(VisionInputError, match=r"\[T, H, W, 3\]"):
        preprocess_video(np.zeros((2, 64, 64), np.uint8), fps=1.0)
    with pytest.raises(VisionInputError, match=r"\[H, W, 3\]"):
        preprocess_image(np.zeros((64, 64, 4), np.uint8))
    with pytest.raises(VisionInputError, match="unsupported image type"):
        preprocess_image(42)
    with pytest.raises(VisionInputError, match="no images"):
        preprocess_images([])

"""Image / video preprocessing against transformers' Qwen2-VL image and video processors, and bad inputs.

The released processor resizes with torchvision (torch's uint8 antialiased bicubic); `resize_bicubic_aa` is
compared with that kernel directly (torch only) and, through `preprocess_image` / `preprocess_video`, with the
default (torchvision) image and video processors (bit-identical pixels; the fused rescale+normalise of the
torchvision backend leaves <= 1 float32 ulp). Inputs that need no resize are also compared bit for bit with the
PIL backend; Pillow's own bicubic differs from torch's by up to ~22 uint8 levels on noise images (measured).
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from hf_fixtures import needs_torchvision
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
    resize_bicubic_aa,
    smart_resize,
)

P = 16


def _hf_processor(min_pixels=3136, max_pixels=12_845_056):
    """The released preprocessor_config values, PIL backend (no torchvision needed)."""
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


ULP = 1e-6  # the torchvision backend rescales and normalises in one step: <= 1 float32 ulp apart


def _tv_image_processor(**kw):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(patch_size=P, temporal_patch_size=2, merge_size=2, min_pixels=kw.get("min_pixels",
                                 3136), max_pixels=kw.get("max_pixels", 12_845_056), image_mean=[0.5] * 3,
                                 image_std=[0.5] * 3)


def _torch_resize(arr, h, w):
    """torchvision's resize of a uint8 image on CPU: torch's native uint8 antialiased bicubic."""
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(t, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


@pytest.mark.parametrize("src, dst", [((100, 73), (96, 64)), ((37, 300), (64, 512)), ((700, 650), (448, 416)),
                                      ((30, 30), (64, 64)), ((333, 517), (333, 512)), ((64, 2000), (80, 2496)),
                                      ((1500, 40), (120, 7))])
def test_resize_bicubic_aa_matches_torch_uint8_kernel(src, dst):
    """Bit-identical to torch's uint8 antialiased bicubic, shrinking (wide taps, high weight precision),
    enlarging, one side only, noise (overshoot clamped between the passes) and smooth images."""
    for arr in (_noise(*src, seed=src[0]), _smooth(*src)):
        np.testing.assert_array_equal(resize_bicubic_aa(arr, *dst), _torch_resize(arr, *dst))
    frames = np.stack([_noise(*src, seed=1), _smooth(*src)])  # [T, H, W, C] resizes frame by frame
    np.testing.assert_array_equal(resize_bicubic_aa(frames, *dst)[1], _torch_resize(frames[1], *dst))


@needs_torchvision
@pytest.mark.parametrize("hw, max_pixels", [((100, 73), None), ((37, 300), None), ((500, 20), None), ((30, 30), None),
                                            ((375, 500), None), ((700, 650), 200_000), ((64, 96), None)])
def test_resize_matches_torchvision_image_processor(hw, max_pixels):
    """The released (default, torchvision) image processor: same grid, same pixels (to 1 ulp) for images that
    are resized (below min_pixels, off the 32 grid, above max_pixels) and one that is not."""
    kw = {} if max_pixels is None else dict(max_pixels=max_pixels)
    for arr in (_noise(*hw, seed=hw[0]), _smooth(*hw)):
        got, grid = preprocess_image(arr, **kw)
        out = _tv_image_processor(**kw)(images=[arr], return_tensors="np")
        assert grid == tuple(int(v) for v in out["image_grid_thw"][0])
        assert (hw == (64, 96)) == (grid[1] * P == hw[0] and grid[2] * P == hw[1])  # resized unless 64x96
        np.testing.assert_allclose(got, out["pixel_values"], rtol=0, atol=ULP)


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


def test_missing_torchvision_fails_under_ci(tmp_path):
    """With torchvision unavailable, a `needs_torchvision` test skips locally and fails under CI=true (a small
    test file run with this directory's conftest as a plugin; nothing heavy is imported)."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    (tmp_path / "test_probe.py").write_text("from hf_fixtures import needs_torchvision\n\n\n"
                                            "@needs_torchvision\ndef test_probe():\n    pass\n")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", "--rootdir",
           str(tmp_path), str(tmp_path / "test_probe.py")]
    path = os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")])
    for ci, code, summary in (("true", 1, "1 error"), ("", 0, "1 skipped")):  # a failed setup is an error
        env = dict(os.environ, CI=ci, OMNI_JAX_HIDE_TORCHVISION="1", PYTHONPATH=path)
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert r.returncode == code and summary in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
        assert ("CI=true: a missing torchvision fails" in r.stdout) == (ci == "true")


@needs_torchvision
@pytest.mark.parametrize("hw", [(64, 96), (900, 1000)])
def test_video_resize_matches_torchvision_video_processor(hw):
    """Frames below (upscaled) and above (downscaled) the per-frame pixel budget against transformers' video
    processor (always torchvision), 3 frames (the last repeated)."""
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    frames = np.stack([_noise(*hw, seed=20 + i) for i in range(3)])
    got, grid, spg = preprocess_video(frames, fps=1.0)
    vp = Qwen2VLVideoProcessor(patch_size=P, temporal_patch_size=2, merge_size=2, min_pixels=VIDEO_MIN_PIXELS,
                               max_pixels=VIDEO_MAX_PIXELS, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    out = vp(videos=[frames], return_tensors="np", do_sample_frames=False)
    assert grid == tuple(int(v) for v in out["video_grid_thw"][0]) and spg == 2.0
    assert VIDEO_MIN_PIXELS <= grid[1] * grid[2] * P * P <= VIDEO_MAX_PIXELS and grid[1] * P != hw[0]
    np.testing.assert_allclose(got, out["pixel_values_videos"], rtol=0, atol=ULP)


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

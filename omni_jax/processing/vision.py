"""Images and video frames -> vision-encoder patches (numpy + Pillow, no torch).

Reproduces the Qwen2-VL image/video processors as Qwen3-Omni configures them (reference spec §5.1, §5.2, P16):
RGB conversion (transparency composited onto white), `smart_resize` to multiples of patch_size*merge_size (32),
antialiased bicubic resize (torch's kernel, see below), rescale by 1/255, normalise with mean = std = 0.5, then
patchify.

Patch order (what the vision encoder expects): for each temporal grid index, the 2x2 merge blocks in raster order
and the 4 patches of a block in raster order, i.e. (grid_t, block_row, block_col, in_row, in_col). Each patch
vector is flatten(C, T, P, P) = 3*2*16*16 = 1536 values, channel-major. A still image fills the T axis with copies
of itself.

Resizing: the released processor resizes with torchvision (`tvF.resize(uint8 image, BICUBIC, antialias=True)`),
which on CPU runs torch's native uint8 antialiased bicubic (Pillow-SIMD's algorithm: float64 Keys-cubic taps
turned into int16 fixed point, a width pass then a height pass in integers, each rounded and clamped to uint8);
its video processor always does. `resize_bicubic_aa` reproduces that kernel in numpy, bit for bit (integer
arithmetic; tested against torch and against transformers' default image and video processors in
tests/test_vision_processing.py). The remaining difference to those processors is their fused rescale+normalise:
<= 1 float32 ulp. Transformers' PIL backend (`Qwen2VLImageProcessorPil`) resizes with Pillow's own bicubic
instead, up to ~22 uint8 levels apart from torch on resized noise images (~2 on smooth ones; measured). Inputs
whose sides are already multiples of 32 and inside the pixel budget are not resized and match every backend
exactly.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from omni_jax.errors import OmniJaxError


class VisionInputError(OmniJaxError):
    """An image or video the processor cannot turn into patches (the message names the problem)."""


# Released Qwen3-Omni processor values (preprocessor_config.json / processor defaults).
PATCH_SIZE = 16
TEMPORAL_PATCH_SIZE = 2
MERGE_SIZE = 2
IMAGE_MIN_PIXELS = 3136
IMAGE_MAX_PIXELS = 12_845_056
VIDEO_MIN_PIXELS = 128 * 32 * 32  # 131072 per frame
VIDEO_MAX_PIXELS = 768 * 32 * 32  # 786432 per frame
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)
MAX_ASPECT_RATIO = 200


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = IMAGE_MIN_PIXELS,
                 max_pixels: int = IMAGE_MAX_PIXELS) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min_pixels, max_pixels], aspect ratio kept.

    Rounding is Python's `round` (half to even), as in the reference.
    """
    if height <= 0 or width <= 0:
        raise VisionInputError(f"image size must be positive, got {height}x{width}")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise VisionInputError(f"image aspect ratio {ratio:.1f} ({height}x{width}) exceeds the maximum of "
                               f"{MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with any transparency composited onto a white background (as the reference does)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(image) -> Image.Image:
    """A PIL image, a path, or a uint8 array [H, W, 3] -> RGB PIL image."""
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as f:
                f.load()
                return _to_rgb(f)
        except (OSError, UnidentifiedImageError) as e:
            raise VisionInputError(f"cannot read image file {os.fspath(image)!r}: {e}") from e
    if isinstance(image, Image.Image):
        return _to_rgb(image)
    if isinstance(image, np.ndarray):
        _check_frames(image[None] if image.ndim == 3 else image, what="image array", ndim=4)
        return Image.fromarray(image)
    raise VisionInputError(f"unsupported image type {type(image).__name__}; pass a PIL image, a path or a uint8 "
                           f"array [H, W, 3]")


def _check_frames(frames, *, what: str, ndim: int = 4):
    if not isinstance(frames, np.ndarray):
        raise VisionInputError(f"{what} must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8:
        raise VisionInputError(f"{what} must have dtype uint8, got {frames.dtype}")
    if frames.ndim != ndim or frames.shape[-1] != 3:
        want = "[H, W, 3]" if what == "image array" else "[T, H, W, 3]"
        raise VisionInputError(f"{what} must have shape {want} (RGB), got {frames.shape}")


def _normalize(rgb_uint8_hwc: np.ndarray, mean, std) -> np.ndarray:
    """uint8 [H, W, C] -> float32 [C, H, W]: x/255 (computed in float64, then float32), then (x - mean) / std."""
    x = (np.moveaxis(rgb_uint8_hwc, -1, 0).astype(np.float64) * (1 / 255)).astype(np.float32)
    mean = np.asarray(mean, np.float32)[:, None, None]
    std = np.asarray(std, np.float32)[:, None, None]
    return (x - mean) / std


def _cubic_aa(x: np.ndarray) -> np.ndarray:
    """Keys cubic convolution kernel (a = -0.5, as Pillow and torch's antialiased bicubic), float64."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1  # |x| < 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a  # 1 <= |x| < 2
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def _aa_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, int]:
    """torch's uint8 antialiased-bicubic taps along one axis (align_corners=False, no scale factor).

    Float64 weights as `_compute_index_ranges_weights<double>` (support widened by the scale when shrinking,
    C casts truncating toward zero), normalised, then turned into int16 fixed point with the largest precision
    that keeps the largest weight below 2**15, rounding half away from zero.
    Returns (input indices int64 [n_out, K], weights int32 [n_out, K], precision bits); unused taps have
    weight 0 and a valid index.
    """
    scale = n_in / n_out
    support = 2.0 * scale if scale >= 1 else 2.0
    invscale = 1.0 / scale if scale >= 1 else 1.0
    center = scale * (np.arange(n_out) + 0.5)
    lo = np.maximum((center - support + 0.5).astype(np.int64), 0)
    hi = np.minimum((center + support + 0.5).astype(np.int64), n_in)
    size = np.clip(hi - lo, 0, int(np.ceil(support)) * 2 + 1)
    j = np.arange(int(size.max()))[None]
    w = np.where(j < size[:, None], _cubic_aa((j + lo[:, None] - center[:, None] + 0.5) * invscale), 0.0)
    total = np.zeros(n_out)
    for k in range(w.shape[1]):  # running sum in tap order, as the C loop
        total = total + w[:, k]
    w = w / total[:, None]
    precision = 0
    while precision < 22 and int(0.5 + w.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    v = w * (1 << precision)
    fixed = np.where(v < 0, np.trunc(v - 0.5), np.trunc(v + 0.5)).astype(np.int32)
    return np.minimum(lo[:, None] + j, n_in - 1), fixed, precision


def _aa_pass(x: np.ndarray, n_out: int, axis: int) -> np.ndarray:
    """One separable pass along `axis` of uint8 x: out[i] = clip((2**(p-1) + sum_k w[i, k] * x[idx[i, k]]) >> p,
    0, 255) with the fixed-point weights of `_aa_taps`. Computed as a sparse float64 product, which is exact:
    every partial sum is an integer far below 2**53, whatever the summation order."""
    from scipy import sparse

    idx, w, precision = _aa_taps(x.shape[axis], n_out)
    n_in = x.shape[axis]
    taps = sparse.csr_matrix((w.ravel().astype(np.float64), idx.ravel(), np.arange(0, w.size + 1, w.shape[1])),
                             shape=(n_out, n_in))
    taps.sum_duplicates()  # clamped indices of unused (zero) taps
    rows = np.moveaxis(x, axis, 0)
    flat = np.ascontiguousarray(rows).reshape(n_in, -1).astype(np.float64)
    acc = taps @ flat + (1 << (precision - 1))
    out = np.clip(np.floor(acc * (1.0 / (1 << precision))), 0, 255).astype(np.uint8)  # exact: a power of 2
    return np.moveaxis(out.reshape((n_out,) + rows.shape[1:]), 0, axis)


def resize_bicubic_aa(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [..., H, W, C] -> uint8 [..., height, width, C] exactly as torchvision's
    `resize(uint8 tensor, BICUBIC, antialias=True)` on CPU (torch's native uint8 kernel): a width pass, then a
    height pass, each only when that side changes, each rounding and clamping to uint8."""
    x = image
    if width != image.shape[-2]:
        x = _aa_pass(x, width, x.ndim - 2)
    if height != image.shape[-3]:
        x = _aa_pass(x, height, x.ndim - 3)
    return x


def _resize(img: Image.Image, factor: int, min_pixels: int, max_pixels: int) -> np.ndarray:
    """RGB PIL image -> uint8 [h, w, 3] at its smart_resize target."""
    arr = np.asarray(img)
    h, w = smart_resize(img.height, img.width, factor, min_pixels, max_pixels)
    return arr if (h, w) == arr.shape[:2] else resize_bicubic_aa(arr, h, w)


def _patchify(frames: np.ndarray, patch_size: int, temporal_patch_size: int, merge_size: int) -> np.ndarray:
    """frames float32 [T, C, H, W] (T a multiple of temporal_patch_size) -> [gt*gh*gw, C*Tp*P*P]."""
    t, c, h, w = frames.shape
    p, tp, m = patch_size, temporal_patch_size, merge_size
    gt, gh, gw = t // tp, h // p, w // p
    x = frames.reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
    # -> (gt, block_row, block_col, in_row, in_col, C, Tp, P, P)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p))


def preprocess_image(image, *, patch_size: int = PATCH_SIZE, temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
                     merge_size: int = MERGE_SIZE, min_pixels: int = IMAGE_MIN_PIXELS,
                     max_pixels: int = IMAGE_MAX_PIXELS, image_mean: Sequence[float] = IMAGE_MEAN,
                     image_std: Sequence[float] = IMAGE_STD) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image -> (patches float32 [gh*gw, 3*T*P*P], grid_thw (1, gh, gw)).

    `image`: PIL image, path, or uint8 array [H, W, 3]. Text gets gh*gw/merge_size**2 image tokens.
    """
    pixels = _resize(load_image(image), patch_size * merge_size, min_pixels, max_pixels)
    x = _normalize(pixels, image_mean, image_std)
    frames = np.broadcast_to(x[None], (temporal_patch_size, *x.shape))
    patches = _patchify(frames, patch_size, temporal_patch_size, merge_size)
    return patches, (1, pixels.shape[0] // patch_size, pixels.shape[1] // patch_size)


def preprocess_images(images, **kwargs) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """Several images -> (concatenated patches, list of grid_thw), in order."""
    out = [preprocess_image(im, **kwargs) for im in images]
    if not out:
        raise VisionInputError("no images given")
    return np.concatenate([p for p, _ in out]), [g for _, g in out]


def preprocess_video(frames: np.ndarray, fps: float = 1.0, *, patch_size: int = PATCH_SIZE,
                     temporal_patch_size: int = TEMPORAL_PATCH_SIZE, merge_size: int = MERGE_SIZE,
                     min_pixels: int = VIDEO_MIN_PIXELS, max_pixels: int = VIDEO_MAX_PIXELS,
                     image_mean: Sequence[float] = IMAGE_MEAN, image_std: Sequence[float] = IMAGE_STD,
                     ) -> tuple[np.ndarray, tuple[int, int, int], float]:
    """Decoded frames uint8 [T, H, W, 3] (already sampled) -> (patches, grid_thw (gt, gh, gw), second_per_grid).

    Every frame is resized to the same smart_resize target (per-frame pixel budget 131072..786432 by default).
    The frame count is padded to a multiple of temporal_patch_size by repeating the last frame.
    `fps` is the rate of the given frames: second_per_grid = temporal_patch_size / fps (the processor's default
    fps is 1.0 when none is passed — pass the real sampling rate).
    """
    _check_frames(frames, what="video frames")
    if frames.shape[0] == 0:
        raise VisionInputError("video has zero frames")
    if not (isinstance(fps, (int, float, np.floating, np.integer)) and math.isfinite(fps) and fps > 0):
        raise VisionInputError(f"video fps must be a positive number, got {fps!r}")
    t, h, w, _ = frames.shape
    th, tw = smart_resize(h, w, patch_size * merge_size, min_pixels, max_pixels)
    out = np.empty((t, 3, th, tw), np.float32)
    for i in range(t):
        frame = frames[i] if (th, tw) == (h, w) else resize_bicubic_aa(frames[i], th, tw)
        out[i] = _normalize(frame, image_mean, image_std)
    if pad := -t % temporal_patch_size:
        out = np.concatenate([out, np.repeat(out[-1:], pad, axis=0)])
    patches = _patchify(out, patch_size, temporal_patch_size, merge_size)
    grid = (out.shape[0] // temporal_patch_size, th // patch_size, tw // patch_size)
    return patches, grid, temporal_patch_size / float(fps)


def load_video_npy(path) -> np.ndarray:
    """A `.npy` file holding uint8 frames [T, H, W, 3]."""
    try:
        frames = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise VisionInputError(f"cannot read video array {os.fspath(path)!r}: {e}") from e
    _check_frames(frames, what="video frames")
    return frames

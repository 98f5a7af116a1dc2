"""The official training augmentation (SPEC §3.1) in numpy + pillow, one image at a time.

Order as in `MaskFormerSemanticDatasetMapper`: ResizeShortestEdge -> category-area-constrained
crop -> ColorAugSSD -> horizontal flip -> pad right/bottom to the crop size (image with raw
pixel 128, SPEC §8 B15; label with the ignore value).

Randomness comes from one `np.random.Generator`, drawn in this order: short side, crop offsets
(y then x, per attempt), colour-jitter coins and values, flip. Same generator state -> same
output; the distributions match the official ones, the streams of course do not.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from runtime.errors import ScanError

# OpenCV's uint8 HSV: hue in 0..179 (degrees / 2), S and V in 0..255; tables in 12-bit fixed point.
_HSV_SHIFT = 12
_HUE_RANGE = 180


class AugmentError(ScanError, ValueError):
    """An image/label pair the augmentation cannot take; the message names both sizes."""


@dataclass
class AugmentConfig:
    min_sizes: tuple[int, ...] = tuple(int(x * 0.1 * 640) for x in range(5, 21))  # 320..1280, one per image
    max_size: int = 2560
    crop_size: tuple[int, int] = (640, 640)  # absolute (h, w), clipped to the resized image
    single_category_max_area: float = 1.0  # >= 1.0: plain random crop
    color_jitter: bool = True  # ColorAugSSD (Mask2Former's version)
    flip_prob: float = 0.5  # horizontal
    pad_value: int = 128  # raw image pixel value of the padding (official mapper)
    ignore_label: int = 255  # label padding, and the value the area rule does not count


def augment(
    image: np.ndarray, label: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """HxWx3 uint8 RGB image + HxW integer label -> (crop_h, crop_w, 3) uint8, (crop_h, crop_w) int64."""
    _validate(image, label)
    label = label.astype(np.int64)

    h, w = image.shape[:2]
    newh, neww = _resized_shape(h, w, int(rng.choice(cfg.min_sizes)), cfg.max_size)
    image = np.asarray(Image.fromarray(image).resize((neww, newh), Image.Resampling.BILINEAR))
    label = _resize_nearest(label, newh, neww)

    y0, x0, ch, cw = _crop_box(label, cfg, rng)
    image, label = image[y0 : y0 + ch, x0 : x0 + cw], label[y0 : y0 + ch, x0 : x0 + cw]

    if cfg.color_jitter:
        image = _color_aug_ssd(image, rng)
    if rng.uniform() < cfg.flip_prob:
        image, label = image[:, ::-1], label[:, ::-1]

    out_image = np.full((*cfg.crop_size, 3), cfg.pad_value, dtype=np.uint8)
    out_label = np.full(cfg.crop_size, cfg.ignore_label, dtype=np.int64)
    out_image[:ch, :cw] = image
    out_label[:ch, :cw] = label
    return out_image, out_label


def targets_from_label(label: np.ndarray, ignore_label: int) -> tuple[np.ndarray, np.ndarray]:
    """(classes int64 (N,), masks bool (N, H, W)): one mask per class present, ascending, ignore excluded."""
    classes = np.unique(label).astype(np.int64)
    classes = classes[classes != ignore_label]
    return classes, label[None] == classes[:, None, None]


def _validate(image: np.ndarray, label: np.ndarray) -> None:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise AugmentError(f"image must be HxWx3 uint8 RGB, got shape {image.shape} dtype {image.dtype}")
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise AugmentError(f"label must be an HxW integer array, got shape {label.shape} dtype {label.dtype}")
    if label.shape != image.shape[:2]:
        raise AugmentError(
            f"label size {label.shape[0]}x{label.shape[1]} differs from image size {image.shape[0]}x{image.shape[1]}"
        )


def _resized_shape(h: int, w: int, short: int, max_size: int) -> tuple[int, int]:
    # detectron2 ResizeShortestEdge: the short side gets `short` exactly, then both are capped, then int(x + 0.5).
    scale = short / min(h, w)
    newh, neww = (short, scale * w) if h < w else (scale * h, short)
    if max(newh, neww) > max_size:
        cap = max_size / max(newh, neww)
        newh, neww = newh * cap, neww * cap
    return int(newh + 0.5), int(neww + 0.5)


def _resize_nearest(label: np.ndarray, newh: int, neww: int) -> np.ndarray:
    # The official mapper casts the label to double, so detectron2 resizes it with torch's legacy
    # 'nearest' (top-left aligned, unlike PIL's NEAREST): src = floorf(float(dst * (in / out))), the
    # product in double, rounded to float32 before the floor (torch 2.x CPU kernel; checked against
    # it). Plain indexing keeps every value (16-bit ones too) exact.
    def index(n_in: int, n_out: int) -> np.ndarray:
        src = np.floor((np.arange(n_out) * (n_in / n_out)).astype(np.float32)).astype(np.int64)
        return np.minimum(src, n_in - 1)

    return label[index(label.shape[0], newh)[:, None], index(label.shape[1], neww)[None, :]]


def _crop_box(label: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> tuple[int, int, int, int]:
    h, w = label.shape
    ch, cw = min(cfg.crop_size[0], h), min(cfg.crop_size[1], w)
    # RandomCrop_CategoryAreaConstraint: up to 10 tries for a crop that is not dominated by one
    # class; the last try is kept when none qualifies. With max area >= 1 the first one is taken.
    for _ in range(1 if cfg.single_category_max_area >= 1.0 else 10):
        y0, x0 = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        values, counts = np.unique(label[y0 : y0 + ch, x0 : x0 + cw], return_counts=True)
        counts = counts[values != cfg.ignore_label]
        if len(counts) > 1 and counts.max() < counts.sum() * cfg.single_category_max_area:
            break
    return y0, x0, ch, cw


# --- ColorAugSSD (Mask2Former). It works in BGR; per-channel math is order-free and the HSV
# conversion below is written for RGB, so we never swap channels. Every step truncates to uint8
# (float32 -> astype(uint8) after clipping), as the original does.


def _color_aug_ssd(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    if rng.integers(2):  # brightness
        image = _affine(image, 1.0, rng.uniform(-32, 32))
    contrast_first = bool(rng.integers(2))
    if contrast_first:
        image = _contrast(image, rng)
    if rng.integers(2):  # saturation: scale S of uint8 HSV
        hsv = _rgb_to_hsv(image)
        hsv[..., 1] = _affine(hsv[..., 1], rng.uniform(0.5, 1.5), 0.0)
        image = _hsv_to_rgb(hsv)
    if rng.integers(2):  # hue: shift in OpenCV units (2 degrees each), wrapping at 180
        hsv = _rgb_to_hsv(image)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + rng.integers(-18, 19)) % _HUE_RANGE
        image = _hsv_to_rgb(hsv)
    if not contrast_first:
        image = _contrast(image, rng)
    return image


def _contrast(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _affine(image, rng.uniform(0.5, 1.5), 0.0) if rng.integers(2) else image


def _affine(x: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    y = x.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(y, 0, 255).astype(np.uint8)


def _rgb_to_hsv(image: np.ndarray) -> np.ndarray:
    """OpenCV COLOR_RGB2HSV for uint8 (fixed-point, hue 0..179), so the round trip loses what OpenCV's does."""
    r, g, b = (image[..., i].astype(np.int64) for i in range(3))
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    one = 1 << _HSV_SHIFT
    sdiv = np.where(v > 0, np.rint((255 * one) / np.maximum(v, 1)), 0).astype(np.int64)
    hdiv = np.where(diff > 0, np.rint((_HUE_RANGE * one) / (6.0 * np.maximum(diff, 1))), 0).astype(np.int64)
    s = (diff * sdiv + one // 2) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv + one // 2) >> _HSV_SHIFT
    h = np.where(h < 0, h + _HUE_RANGE, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


def _hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """OpenCV COLOR_HSV2RGB for uint8 as its vectorised loop computes it: float32 sector formula
    with fused multiply-adds, then truncation. (OpenCV's scalar tail, the last width % 32 or % 64
    pixels of a row depending on the CPU, rounds instead: at most 1 level apart there.)"""
    one = np.float32(1)
    h = hsv[..., 0].astype(np.float32) * (np.float32(6) / np.float32(_HUE_RANGE))
    s = hsv[..., 1].astype(np.float32) * (one / np.float32(255))
    v = hsv[..., 2].astype(np.float32) * (one / np.float32(255))
    sector = np.floor(h)
    f = h - sector

    def one_minus(a: np.ndarray, b: np.ndarray) -> np.ndarray:  # round32(1 - a*b), product exact as in an FMA
        return (1.0 - a.astype(np.float64) * b.astype(np.float64)).astype(np.float32)

    tab = np.stack([v, v * (one - s), v * one_minus(s, f), v * one_minus(s, one - f)])
    # (r, g, b) rows of `tab` per sector; OpenCV's table lists them as (b, g, r).
    order = np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])[sector.astype(np.int64) % 6]
    rgb = np.take_along_axis(tab, np.moveaxis(order, -1, 0), axis=0) * np.float32(255)
    return np.clip(np.moveaxis(rgb, 0, -1), 0, 255).astype(np.uint8)

"""Model-input formulas of the eager model, in numpy (SPEC §1.2, §1.3).

Twins of ``ScanModel.normalise_and_pad`` and ``ScanModel.clip_input``; both reproduce
PyTorch's float32 results bit for bit. No torch here: this module is part of the runtime.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["normalise_and_pad", "nearest_square", "nearest_indices"]


def normalise_and_pad(
    image: np.ndarray,
    mean: Sequence[float] | np.ndarray,
    std: Sequence[float] | np.ndarray,
    divisibility: int = 32,
) -> np.ndarray:
    """(x - mean) / std, then zero padding right and bottom to a multiple of ``divisibility``.

    Padding comes after normalisation (detectron2's ``ImageList``), so the border is 0 in
    normalised units, not the mean colour.

    Args:
        image: (H, W, 3) uint8 RGB.
        mean, std: (3,) per-channel statistics in 0..255 units, used as float32 (pass the
            model's own float32 values: e.g. the CLIP statistics are float32(mean) * 255).
        divisibility: padded height and width are multiples of this.
    Returns:
        (1, 3, Hp, Wp) float32.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) image, got shape {image.shape}")
    if divisibility < 1:
        raise ValueError(f"divisibility must be >= 1, got {divisibility}")
    height, width = image.shape[:2]
    padded_h = -(-height // divisibility) * divisibility
    padded_w = -(-width // divisibility) * divisibility
    mean32 = np.asarray(mean, dtype=np.float32).reshape(3, 1, 1)
    std32 = np.asarray(std, dtype=np.float32).reshape(3, 1, 1)

    out = np.zeros((1, 3, padded_h, padded_w), dtype=np.float32)
    body = out[0, :, :height, :width]
    # uint8 -> float32 is exact; subtraction and true division are single IEEE float32
    # operations here as in PyTorch, hence identical bits.
    np.subtract(image.transpose(2, 0, 1), mean32, out=body, dtype=np.float32)
    np.divide(body, std32, out=body)
    return out


def nearest_indices(in_size: int, out_size: int) -> np.ndarray:
    """Source index of every output sample of PyTorch's legacy ``mode="nearest"``.

    ``min(floor(dst * scale), in - 1)`` with ``scale = float32(in) / float32(out)`` and the
    product rounded to float32 (no half-pixel offset: this is not "nearest-exact").
    """
    scale = np.float32(in_size) / np.float32(out_size)
    src = np.arange(out_size, dtype=np.float32) * scale
    return np.minimum(np.floor(src).astype(np.int64), in_size - 1)


def nearest_square(x: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour squash to (size, size), ``F.interpolate(mode="nearest")`` semantics.

    Args:
        x: (N, C, H, W) array (the padded, CLIP-normalised image).
        size: output side (the CLIP input resolution).
    Returns:
        (N, C, size, size), same dtype, copied pixels only.
    """
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"expected an (N, C, H, W) array, got shape {x.shape}")
    rows = nearest_indices(x.shape[2], size)
    cols = nearest_indices(x.shape[3], size)
    return x[:, :, rows[:, None], cols[None, :]]

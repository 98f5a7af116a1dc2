"""Region preparation for the region classifier: boxes, masked crops, bicubic resize, region masks.

The official adapter (SPEC.md §1.11 steps 2-7) loops over the masks in Python: it thresholds the
mask probabilities, takes detectron2 ``BitMasks.get_bounding_boxes`` boxes, crops
``I * M + (1 - M) * fill`` from the unpadded image, normalises it with the CLIP mean/std and resizes
each crop to 224x224 with ``F.interpolate`` (bicubic for the image, legacy nearest for the mask).
Every step there has a data-dependent shape (SPEC.md §7 items 13-16).

Here all boxes are processed at once with fixed shapes (EXPORT_NOTES.md §3.6, row 6b of §2):

* boxes come from masked min/max over the row/column occupancy, no NonZero;
* the bicubic resize is separable, so it is a gather of 4 taps per output column (x pass over every
  image row) followed by a gather of 4 taps per output row (y pass), with per-box tap indices and
  weights. Masking commutes with gathering, so the mask is gathered with the same indices and
  applied with ``where``. Tap indices are clamped to the crop, which is exactly what
  ``F.interpolate`` on the sliced crop does (``grid_sample`` would read outside pixels, row 6a);
* the tap indices and weights reproduce PyTorch's compiled CPU kernel bit for bit (float32
  ``scale = in / out``, ``src = scale * (dst + 0.5) - 0.5`` unclamped, ``floor``, cubic
  coefficients with A = -0.75, including the roundings its FMA contractions save), and the taps
  are summed in the kernel's order (x taps per row, then y taps). Only the fused accumulation
  rounding is left, so crops agree with the per-region reference to an ulp or two.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# PyTorch's bicubic convolution constant (F.interpolate mode="bicubic").
CUBIC_A = -0.75

# CLIP (OpenAI) image statistics, 0..1 units.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# The official region fill: 255 * mean in float64, stored as float32 (SPEC.md §1.11 step 5).
CLIP_MEAN_255 = tuple(255.0 * v for v in OPENAI_MEAN)
CLIP_STD_255 = tuple(255.0 * v for v in OPENAI_STD)


def clip_pixel_stats() -> tuple[Tensor, Tensor]:
    """The official adapter's ``pixel_mean`` / ``pixel_std`` buffers as (3,) float32 tensors.

    They are ``float32(mean) * 255`` computed in float32, which differs in the last bits from
    ``CLIP_MEAN_255`` (122.77094269 vs 122.77093506 for red): the official crops are filled with
    the latter and normalised with the former (checked against the fixture).
    """
    return torch.tensor(OPENAI_MEAN) * 255, torch.tensor(OPENAI_STD) * 255


@dataclass
class RegionBatch:
    """Region-classifier inputs for one image with Q query masks, Nv of them valid.

    valid: (Q,) bool, mask non-empty after thresholding.
    boxes: (Nv, 4) int64 [x0, y0, x1, y1], right/bottom exclusive, valid masks only.
    regions: (Nv, 3, S, S) float, CLIP-normalised bicubic crops.
    region_masks: (Nv, 1, S, S) float 0/1, nearest-resized cropped masks.
    areas: (Q,) int64, foreground pixel count of every thresholded mask.
    """

    valid: Tensor
    boxes: Tensor
    regions: Tensor
    region_masks: Tensor
    areas: Tensor


def mask_boxes(binary: Tensor) -> tuple[Tensor, Tensor]:
    """Tight boxes of binary masks, detectron2 ``BitMasks.get_bounding_boxes`` semantics.

    Args:
        binary: (N, H, W) bool.
    Returns:
        boxes: (N, 4) int64 [x0, y0, x1, y1] with x1 = max_x + 1 and y1 = max_y + 1 (exclusive).
            Empty masks get the full image box [0, 0, W, H] (detectron2 gives zeros; those rows are
            dropped by ``valid`` anyway, and a non-empty box keeps the crop arithmetic well defined).
        valid: (N,) bool, mask non-empty.
    """
    H, W = binary.shape[-2], binary.shape[-1]
    cols = binary.any(dim=1)  # (N, W)
    rows = binary.any(dim=2)  # (N, H)
    valid = cols.any(dim=1)
    xs = torch.arange(W, device=binary.device)
    ys = torch.arange(H, device=binary.device)
    x0 = torch.where(cols, xs, W).amin(dim=1)
    x1 = torch.where(cols, xs + 1, 0).amax(dim=1)
    y0 = torch.where(rows, ys, H).amin(dim=1)
    y1 = torch.where(rows, ys + 1, 0).amax(dim=1)
    x0 = torch.where(valid, x0, 0)
    y0 = torch.where(valid, y0, 0)
    x1 = torch.where(valid, x1, W)
    y1 = torch.where(valid, y1, H)
    return torch.stack([x0, y0, x1, y1], dim=1), valid


def _split(a: Tensor) -> tuple[Tensor, Tensor]:
    """Veltkamp split of float32 values into two halves of <= 12 significant bits each."""
    c = a * 4097.0
    hi = c - (c - a)
    return hi, a - hi


def _fma(a: Tensor, b: Tensor | float, c: Tensor | float) -> Tensor:
    """float32 ``a * b + c`` rounded once, like a fused multiply-add, from float32 ops only.

    PyTorch's CPU interpolation kernels are compiled with FMA contraction, so some of their index
    and weight expressions are rounded once instead of twice. A plain evaluation differs by one ulp
    of the source coordinate (6e-5 at src ~ 600) and, through cancellation in the outer cubic
    coefficient, by up to 1.4e-6 in a weight. Error-free transforms (Dekker's two-product, Knuth's
    two-sum) recover the single rounding without float64, which TensorRT lacks. Checked equal to a
    float64 fma on every source coordinate for crop sizes 1..2999 and on 2e6 coefficient arguments.
    """
    b = torch.as_tensor(b, dtype=a.dtype, device=a.device)
    p = a * b
    a_hi, a_lo = _split(a)
    b_hi, b_lo = _split(b)
    p_err = ((a_hi * b_hi - p) + a_hi * b_lo + a_lo * b_hi) + a_lo * b_lo
    s = p + c
    s_b = s - p
    s_err = (p - (s - s_b)) + (c - s_b)
    return s + (p_err + s_err)


def _cubic_taps(start: Tensor, length: Tensor, size: int) -> tuple[Tensor, Tensor]:
    """Bicubic taps for resizing each crop [start, start + length) of one axis to ``size`` samples.

    Mirrors PyTorch's CPU ``upsample_bicubic2d`` (align_corners=False, no antialias) as compiled,
    i.e. with the FMA contractions it gets (found by matching its weights bit for bit):
    float32 ``scale = length / size``; ``src = fma(scale, dst + 0.5, -0.5)`` (not clamped for cubic);
    ``i = min(floor(src), length - 1)``; ``t = clamp(src - i, 0, 1)``; coefficients
    ``near(x) = fma(A + 2, x, -(A + 3)) * x * x + 1`` for x = t, 1 - t and
    ``far(x) = fma(fma(A, x, -5A), x, 8A) * x - 4A`` for x = t + 1, (1 - t) + 1, with A = -0.75;
    taps ``i - 1 .. i + 2`` clamped to the crop ``[0, length - 1]`` and then offset by ``start``.

    Args:
        start, length: (N,) int64.
    Returns:
        index: (N, size, 4) int64 absolute image coordinates.
        weight: (N, size, 4) float32 cubic coefficients.
    """
    dst = torch.arange(size, device=start.device, dtype=torch.float32) + 0.5
    scale = (length.to(torch.float32) / size)[:, None]  # (float)in / out, as in compute_scales_value
    src = _fma(scale.expand(-1, size), dst, -0.5)  # (N, size)
    last = (length - 1)[:, None]
    base = torch.minimum(torch.floor(src).to(torch.int64), last)
    t = (src - base.to(torch.float32)).clamp(0.0, 1.0)
    a = CUBIC_A

    def near(x: Tensor) -> Tensor:  # |x| <= 1
        return _fma(x, a + 2, -(a + 3)) * x * x + 1

    def far(x: Tensor) -> Tensor:  # 1 < |x| < 2
        return _fma(_fma(x, a, -5 * a), x, 8 * a) * x - 4 * a

    u = 1.0 - t
    weight = torch.stack([far(t + 1.0), near(t), near(u), far(u + 1.0)], dim=-1)
    offsets = torch.arange(-1, 3, device=start.device)
    index = (base[..., None] + offsets).clamp(min=0)
    index = torch.minimum(index, last[..., None]) + start[:, None, None]
    return index, weight


def _weighted_taps(values: Tensor, weight: Tensor, dim: int) -> Tensor:
    """sum_k values.select(dim, k) * weight.select(dim, k) over the 4 taps along ``dim``.

    Summed in the order of PyTorch's compiled kernel, ``fma(v3, w3, fma(v2, w2, fma(v0, w0,
    v1 * w1)))``. The fused roundings are not emulated here (that would multiply the arithmetic on
    the largest tensors by about nine), so results differ from ``F.interpolate`` by an ulp or two.
    """
    v0, v1, v2, v3 = values.unbind(dim)
    w0, w1, w2, w3 = weight.unbind(dim)
    return v1 * w1 + v0 * w0 + v2 * w2 + v3 * w3


def _nearest_index(start: Tensor, length: Tensor, size: int) -> Tensor:
    """Legacy ``mode="nearest"`` source index per crop, (N, size) absolute coordinates.

    PyTorch: ``min(floor(dst * (float)(in / out)), in - 1)`` in float32, no half-pixel offset.
    """
    dst = torch.arange(size, device=start.device, dtype=torch.float32)
    scale = length.to(torch.float32) / size
    src = torch.floor(dst * scale[:, None]).to(torch.int64)
    return torch.minimum(src, (length - 1)[:, None]) + start[:, None]


def crop_regions(
    image: Tensor,
    binary: Tensor,
    boxes: Tensor,
    mean: Tensor,
    std: Tensor,
    size: int = 224,
    fill: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Masked, normalised, bicubic-resized crops and nearest-resized crop masks for all boxes at once.

    Equals, per mask k with box (l, t, r, b) and M = binary[k] as float, the official
    ``F.interpolate(((I[:, t:b, l:r] * M[t:b, l:r] + (1 - M[t:b, l:r]) * fill) - mean) / std,
    (size, size), mode="bicubic")`` and ``F.interpolate(M[t:b, l:r], (size, size), mode="nearest")``
    (SPEC.md §1.11 steps 5-7), without a per-mask loop or data-dependent shapes.

    Args:
        image: (3, H, W) float, 0..255, the unpadded resized image (not normalised).
        binary: (N, H, W) bool masks.
        boxes: (N, 4) int64 [x0, y0, x1, y1] from ``mask_boxes`` (non-empty: x1 > x0, y1 > y0).
        mean, std: (3,) float in 0..255 units.
        size: output side S.
        fill: (3,) value outside the mask before normalisation; default ``mean`` (normalises to 0).
            The official code fills with ``CLIP_MEAN_255`` (255 * mean in float64, then float32) but
            normalises with its float32 ``pixel_mean`` buffer (``CLIP_PIXEL_MEAN``), so its
            background is (fill - mean) / std ~ -1e-7 rather than 0.
    Returns:
        regions: (N, 3, S, S) float.
        region_masks: (N, 1, S, S) float 0/1.
    """
    N, H, W = binary.shape
    mean = mean.to(image)
    std = std.to(image)
    fill = mean if fill is None else fill.to(image)
    # Per pixel the official crop is I (mask 1: I * 1 + 0 * fill) or fill (mask 0: I * 0 + 1 * fill),
    # so its normalised value is where(mask, normed, background): masking commutes with gathering.
    normed = (image - mean[:, None, None]) / std[:, None, None]  # (3, H, W)
    background = ((fill - mean) / std)[:, None]  # (3, 1)
    x0, y0, x1, y1 = boxes.unbind(1)
    width, height = x1 - x0, y1 - y0
    ix, wx = _cubic_taps(x0, width, size)  # (N, S, 4)
    iy, wy = _cubic_taps(y0, height, size)
    box_id = torch.arange(N, device=image.device)[:, None, None]

    # x pass, over every image row. Gathering whole image columns (rows of the transposed image)
    # copies contiguous runs, which is much faster than an element gather.
    columns = normed.permute(2, 0, 1).reshape(W, 3 * H).index_select(0, ix.reshape(-1))
    columns = columns.reshape(N, size, 4, 3, H)
    mask_columns = binary.transpose(1, 2).reshape(N * W, H).index_select(0, (ix + box_id * W).reshape(-1))
    mask_columns = mask_columns.reshape(N, size, 4, 1, H)
    taps = torch.where(mask_columns, columns, background)
    xpass = _weighted_taps(taps, wx[:, :, :, None, None], dim=2)  # (N, S_x, 3, H)

    # y pass: for each output row, the 4 tap rows of that box's x-pass result.
    xpass = xpass.permute(0, 3, 1, 2).reshape(N * H, size * 3)  # rows (n, y), columns (x, c)
    rows = xpass.index_select(0, (iy + box_id * H).reshape(-1)).reshape(N, size, 4, size, 3)
    regions = _weighted_taps(rows, wy[:, :, :, None, None], dim=2)  # (N, S_y, S_x, 3)
    regions = regions.permute(0, 3, 1, 2).contiguous()

    my, mx = _nearest_index(y0, height, size), _nearest_index(x0, width, size)  # (N, S)
    flat = (my[:, :, None] * W + mx[:, None, :]).reshape(N, size * size)
    region_masks = binary.reshape(N, H * W).gather(1, flat).reshape(N, 1, size, size)
    return regions, region_masks.to(image.dtype)


def prepare_regions(
    image: Tensor,
    mask_probs: Tensor,
    threshold: float,
    mean: Tensor,
    std: Tensor,
    size: int = 224,
    chunk_size: int = 16,
    fill: Tensor | None = None,
) -> RegionBatch:
    """Threshold mask probabilities and build the region-classifier inputs of the valid masks.

    Host-side convenience (not an export graph): valid rows are selected with boolean indexing
    like the official adapter (SPEC.md §1.11 step 2), and crops are computed ``chunk_size`` masks
    at a time to bound peak memory (the x pass holds about ``2 * chunk_size * 4 * size * 3 * H``
    floats, 220 MB at chunk 16, H 640). With no valid mask it returns empty tensors instead of crashing (official bug
    B3, SPEC.md §8).

    Args:
        image: (3, H, W) float, 0..255, unpadded.
        mask_probs: (Q, H, W) float, sigmoid of the mask logits.
        threshold: MASK_THR; foreground is ``mask_probs > threshold`` (strict).
        mean, std, fill: as in ``crop_regions``.
    """
    binary = mask_probs > threshold
    boxes, valid = mask_boxes(binary)
    areas = binary.sum(dim=(1, 2))
    binary, boxes = binary[valid], boxes[valid]
    regions = [image.new_zeros((0, 3, size, size))]
    region_masks = [image.new_zeros((0, 1, size, size))]
    for start in range(0, binary.shape[0], chunk_size):
        stop = start + chunk_size
        r, m = crop_regions(image, binary[start:stop], boxes[start:stop], mean, std, size, fill)
        regions.append(r)
        region_masks.append(m)
    return RegionBatch(
        valid=valid, boxes=boxes, regions=torch.cat(regions), region_masks=torch.cat(region_masks), areas=areas
    )

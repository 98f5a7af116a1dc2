"""Bilinear resizing as ``F.interpolate(mode="bilinear", align_corners=False)``, in numpy.

Per axis, output d reads s = max(scale * (d + 0.5) - 0.5, 0), scale = in / out, from the taps
i0 = min(floor(s), in - 1) and i1 = min(i0 + 1, in - 1) with weights 1 - l and l = s - i0.
Width first, then height, in plain float32: within a few roundings of PyTorch's values (which
fuse some multiply-adds, per build and device) on any host, whatever the bands or blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Taps", "axis_taps", "width_pass", "height_blocks", "resize_bilinear"]

F32 = np.float32
BLOCK = 1 << 16  # values per numpy call in loops: amortises the call, stays in the L2 cache


@dataclass(frozen=True)
class Taps:
    """One axis: out[i] = x[lo[i]] * w_lo[i] + x[hi[i]] * w_hi[i] (int64 indices, float32 weights)."""

    lo: np.ndarray
    hi: np.ndarray
    w_lo: np.ndarray
    w_hi: np.ndarray
    # in == out: lo[i] = lo[0] + i with weights 1 and 0, so outputs are copies (x * 1 + y * 0
    # is x for finite y; PyTorch gives NaN next to an infinite y).
    identity: bool

    def window(self, part: slice, offset: int = 0) -> Taps:
        """The taps of outputs ``part``, source index ``offset`` read as 0."""
        return Taps(self.lo[part] - offset, self.hi[part] - offset, self.w_lo[part], self.w_hi[part], self.identity)

    def span(self) -> slice:
        """The source indices read."""
        return slice(int(self.lo[0]), int(self.hi[-1]) + 1)


def axis_taps(in_size: int, out_size: int) -> Taps:
    scale = F32(in_size) / F32(out_size)  # float32, as PyTorch
    # s is exact in float64 (24 by 25-bit product, then a sum within 53 bits), so it is rounded
    # once: PyTorch's fused multiply-add (CPU, CUDA). Rounded twice, s can move by ulp(s), and
    # outputs by ulp(s) * |x[i1] - x[i0]|: up to ~s float32 ulps of the inputs' magnitude.
    src = np.maximum(np.float64(scale) * (np.arange(out_size) + 0.5) - 0.5, 0.0).astype(F32)
    lo = np.minimum(src.astype(np.int64), in_size - 1)  # src >= 0: truncation is floor
    w_hi = np.clip(src - lo.astype(F32), F32(0), F32(1))  # an exact subtraction
    return Taps(lo, np.minimum(lo + 1, in_size - 1), F32(1) - w_hi, w_hi, identity=in_size == out_size)


def _lerp(x: np.ndarray, taps: Taps, axis: int, out: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """out = x[lo] * w_lo + x[hi] * w_hi along ``axis``; a, b: scratch of out's shape."""
    weight = slice(None) if axis == x.ndim - 1 else (slice(None), None)
    np.take(x, taps.lo, axis=axis, out=a, mode="clip")  # "clip": a contiguous `out` is not buffered
    np.take(x, taps.hi, axis=axis, out=b, mode="clip")
    a *= taps.w_lo[weight]
    b *= taps.w_hi[weight]
    return np.add(a, b, out=out)


def width_pass(x: np.ndarray, cols: Taps) -> np.ndarray:
    """(C, n, w) -> (C, n, W) along the last axis; a view of ``x`` for identity taps."""
    if cols.identity:
        return x[:, :, cols.lo[0] : cols.lo[0] + cols.lo.size]
    flat = np.ascontiguousarray(x).reshape(-1, x.shape[2])  # the rows of all channels
    out = np.empty((flat.shape[0], cols.lo.size), dtype=F32)
    step = max(1, BLOCK // cols.lo.size)
    a, b = (np.empty_like(out[:step]) for _ in range(2))
    for start in range(0, flat.shape[0], step):
        part = slice(start, min(start + step, flat.shape[0]))
        _lerp(flat[part], cols, 1, out[part], a[: part.stop - start], b[: part.stop - start])
    return out.reshape(*x.shape[:2], -1)


def height_blocks(t: np.ndarray, rows: Taps, out: np.ndarray | None = None, block: int = BLOCK):
    """Interpolate (C, n, W) ``t`` along axis 1 in blocks of about ``block`` values (>= 1 row).

    Yields (slice of output rows, (C, b, W) values): views of ``out`` (C, len(rows), W) if
    given, else of scratch (or of ``t`` for identity taps) valid until the next block.
    """
    channels, _, width = t.shape
    step = max(1, block // max(1, channels * width))
    a, b = (np.empty((channels, min(step, rows.lo.size), width), dtype=F32) for _ in range(2))
    for start in range(0, rows.lo.size, step):
        part = slice(start, min(start + step, rows.lo.size))
        taps, size = rows.window(part), part.stop - start
        if rows.identity:
            values = t[:, taps.lo[0] : taps.lo[0] + size]
            if out is not None:
                out[:, part] = values
        else:
            values = _lerp(t, taps, 1, a[:, :size] if out is None else out[:, part], a[:, :size], b[:, :size])
        yield part, values


def resize_bilinear(x: np.ndarray, size: tuple[int, int], rows: slice | None = None,
                    cols: slice | None = None) -> np.ndarray:
    """``F.interpolate(x[None], size, mode="bilinear", align_corners=False)[0]``: (C, h, w) ->
    (C, len(rows), len(cols)) float32. ``rows``, ``cols``: contiguous slices of the output
    (default all), so that a large output can be made band by band, equal to the whole's rows."""
    x = np.asarray(x, dtype=F32)
    if x.ndim != 3 or min(size) < 1:
        raise ValueError(f"expected a (C, h, w) array and a positive size, got {x.shape} and {size}")
    windows = [range(n)[part or slice(None)] for part, n in ((rows, size[0]), (cols, size[1]))]
    if any(w.step != 1 for w in windows):
        raise ValueError(f"rows and cols must be contiguous slices (step 1), got {rows}, {cols}")
    row_taps, col_taps = (axis_taps(n_in, n_out).window(slice(w.start, w.stop))
                          for n_in, n_out, w in zip(x.shape[1:], size, windows))
    out = np.empty((x.shape[0], len(windows[0]), len(windows[1])), dtype=F32)
    if out.size:
        span = row_taps.span()
        for _ in height_blocks(width_pass(x[:, span], col_taps), row_taps.window(slice(None), span.start), out=out):
            pass
    return out

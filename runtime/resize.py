"""Bilinear resizing as ``F.interpolate(mode="bilinear", align_corners=False)``, in numpy, on threads.

Per axis, output d reads s = max(scale * (d + 0.5) - 0.5, 0), scale = in / out, from the taps
i0 = min(floor(s), in - 1) and i1 = min(i0 + 1, in - 1) with weights 1 - l and l = s - i0.
Width first, then height, each pass x[i0] * w0 + x[i1] * w1 in plain float32 (two rounded
products, then their rounded sum): within a few roundings of PyTorch's values (which fuse some
multiply-adds, per build and device) on any host.

Every output value is that same formula whatever the bands, blocks, layout (planes (C, h, w)
here, pixels (h, w, C) in ``runtime.postprocess``) and number of threads, so results are
bit-identical however the work is split. numpy releases the GIL inside ufuncs, ``take`` and
matrix products, so the threads run in parallel.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import Callable

import numpy as np

__all__ = ["Taps", "Scratch", "axis_taps", "lerp", "resize_bilinear", "row_bands", "run_tasks", "thread_count",
           "usable_cpus"]

F32 = np.float32
BLOCK = 1 << 16  # values per numpy call in loops: amortises the call, stays in the L2 cache
_BAND_ROWS = 64  # output rows per band: neighbouring bands re-read a source row, 1 in 16 at 4x
_BAND_VALUES = 1 << 21  # width-resized source values a band may hold (8 MiB)


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


def row_bands(rows: Taps, max_rows: int, max_span: int) -> list[slice]:
    """Consecutive bands of at most ``max_rows`` outputs that read at most ``max_span`` source
    rows each (a single output reading more is a band of its own)."""
    bands, start, count = [], 0, rows.lo.size
    while start < count:
        # hi is non-decreasing: the first output past the span limit, found by bisection
        stop = int(np.searchsorted(rows.hi, rows.lo[start] + max_span - 1, side="right"))
        stop = min(max(stop, start + 1), start + max_rows, count)
        bands.append(slice(start, stop))
        start = stop
    return bands


# -- threads ------------------------------------------------------------------------------------


def usable_cpus() -> int:
    """The CPUs this process may run on: its affinity mask where the OS has one."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def thread_count(threads: int | None) -> int:
    """``threads``, or every usable CPU for None."""
    count = usable_cpus() if threads is None else int(threads)
    if count < 1:
        raise ValueError(f"threads must be at least 1, got {threads}")
    return count


class Scratch:
    """One worker's reusable buffers, by name: a task allocates (and page-faults) nothing new
    once the worker has run a task of its size."""

    def __init__(self):
        self._buffers: dict[str, np.ndarray] = {}

    def array(self, name: str, shape: tuple[int, ...], dtype=F32) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape``, sharing memory with the last one of ``name``."""
        size, buffer = math.prod(shape), self._buffers.get(name)
        if buffer is None or buffer.size < size or buffer.dtype != dtype:
            buffer = self._buffers[name] = np.empty(size, dtype)
        return buffer[:size].reshape(shape)


def run_tasks(task: Callable[[object, Scratch], None], items, threads: int) -> None:
    """``task(item, scratch)`` for every item, on up to ``threads`` threads (here for one).

    Workers take the next item when they finish one, so a core slowed by other work takes fewer;
    each keeps one `Scratch`. Tasks write disjoint parts of the outputs. The first error raises here.
    """
    items = list(items)
    workers = min(threads, len(items))
    if workers <= 1:
        scratch = Scratch()
        for item in items:
            task(item, scratch)
        return
    pending: SimpleQueue = SimpleQueue()
    for item in items:
        pending.put(item)

    def work() -> None:
        scratch = Scratch()
        while True:
            try:
                item = pending.get_nowait()
            except Empty:
                return
            task(item, scratch)

    with ThreadPoolExecutor(workers, thread_name_prefix="scan-postprocess") as pool:
        for done in [pool.submit(work) for _ in range(workers)]:
            done.result()


# -- passes -------------------------------------------------------------------------------------


def lerp(x: np.ndarray, taps: Taps, axis: int, out: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """out = x[lo] * w_lo + x[hi] * w_hi along ``axis`` of C-contiguous ``x`` (any layout: the
    weights broadcast along that axis); ``upper``: scratch of out's shape."""
    weights = (slice(None),) + (None,) * (x.ndim - 1 - axis)
    np.take(x, taps.lo, axis=axis, out=out, mode="clip")  # "clip": a contiguous `out` is not buffered
    np.take(x, taps.hi, axis=axis, out=upper, mode="clip")
    out *= taps.w_lo[weights]
    upper *= taps.w_hi[weights]
    return np.add(out, upper, out=out)


def _width_pass(source: np.ndarray, cols: Taps, scratch: Scratch) -> np.ndarray:
    """(C, n, w) -> (C, n, W) along the last axis; a view of ``source`` for identity taps."""
    if cols.identity:
        return source[:, :, cols.lo[0] : cols.lo[0] + cols.lo.size]
    if not source.flags.c_contiguous:  # `take` would copy it twice (once per tap)
        staged = scratch.array("source", source.shape)
        np.copyto(staged, source)
        source = staged
    shape = (*source.shape[:2], cols.lo.size)
    return lerp(source, cols, 2, scratch.array("wide", shape), scratch.array("wide_hi", shape))


def _resize_band(x: np.ndarray, rows: Taps, cols: Taps, out: np.ndarray, finish_negated, weights,
                 item: tuple[slice, slice], scratch: Scratch) -> None:
    """Output rows ``band`` of the planes ``channels``: the width pass of the source rows they
    read, then each output row for all those planes at once, straight into ``out``."""
    channels, band = item
    span = rows.window(band).span()
    wide = _width_pass(x[channels, span], cols, scratch)
    taps = rows.window(band, span.start)
    w_lo, w_hi = (w[band] for w in weights)
    shape = (wide.shape[0], wide.shape[2])
    lower, upper = scratch.array("lower", shape), scratch.array("upper", shape)
    for i, y in enumerate(range(band.start, band.stop)):
        target = out[channels, y]
        if rows.identity:
            if finish_negated is None:
                target[...] = wide[:, taps.lo[i]]
            else:
                finish_negated(np.negative(wide[:, taps.lo[i]], out=lower), target)
            continue
        np.multiply(wide[:, taps.lo[i]], w_lo[i], out=lower)
        np.multiply(wide[:, taps.hi[i]], w_hi[i], out=upper)
        if finish_negated is None:
            np.add(lower, upper, out=target)
        else:
            finish_negated(np.add(lower, upper, out=lower), target)


def resize_bilinear(x: np.ndarray, size: tuple[int, int], rows: slice | None = None, cols: slice | None = None,
                    threads: int | None = None, finish_negated: Callable | None = None,
                    budget_bytes: int = 256 << 20) -> np.ndarray:
    """``F.interpolate(x[None], size, mode="bilinear", align_corners=False)[0]``: (C, h, w) ->
    (C, len(rows), len(cols)) float32. ``rows``, ``cols``: contiguous slices of the output
    (default all), so that a large output can be made band by band, equal to the whole's rows.

    ``threads``: how many threads share the work (default every usable CPU); it changes no value.
    ``finish_negated(v, target)``, if given, receives each block of values negated (in contiguous
    scratch, while in cache) and writes the block's final values into ``target``: a fused
    elementwise function f(-v), e.g. the sigmoid 1 / (1 + exp(-v)). Negating the weights gives
    -v exactly (rounding is symmetric in sign), at no cost. The threads' scratch stays under
    about ``budget_bytes`` together (the output not counted).
    """
    x = np.asarray(x, dtype=F32)
    if x.ndim != 3 or min(size) < 1:
        raise ValueError(f"expected a (C, h, w) array and a positive size, got {x.shape} and {size}")
    windows = [range(n)[part or slice(None)] for part, n in ((rows, size[0]), (cols, size[1]))]
    if any(w.step != 1 for w in windows):
        raise ValueError(f"rows and cols must be contiguous slices (step 1), got {rows}, {cols}")
    row_taps, col_taps = (axis_taps(n_in, n_out).window(slice(w.start, w.stop))
                          for n_in, n_out, w in zip(x.shape[1:], size, windows))
    out = np.empty((x.shape[0], len(windows[0]), len(windows[1])), dtype=F32)
    if out.size == 0:
        return out
    sign = F32(1) if finish_negated is None else F32(-1)
    weights = (row_taps.w_lo * sign, row_taps.w_hi * sign)
    # Blocks of about BLOCK values: one output row of `planes` channels at once.
    planes, workers = max(1, BLOCK // out.shape[2]), thread_count(threads)
    max_span = _max_span(planes, x.shape[2], out.shape[2], budget_bytes // workers)
    items = [(slice(c, c + planes), band) for c in range(0, x.shape[0], planes)
             for band in row_bands(row_taps, _BAND_ROWS, max_span)]

    def task(item, scratch):
        _resize_band(x, row_taps, col_taps, out, finish_negated, weights, item, scratch)

    run_tasks(task, items, workers)
    return out


def _max_span(planes: int, in_width: int, out_width: int, worker_bytes: int) -> int:
    """Source rows per band such that a worker's scratch fits ``worker_bytes``: the band's source
    rows (a contiguous copy) and their width-resized pair, then two output rows. Bands change no
    value, so they may depend on the thread count."""
    per_source_row = 4 * planes * (in_width + 2 * out_width)
    fitting = (worker_bytes - 8 * planes * out_width) // per_source_row
    return int(max(2, min(fitting, _BAND_VALUES // (planes * out_width))))

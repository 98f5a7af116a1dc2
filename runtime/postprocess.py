"""The eager model's post-processing in numpy, torch-free: twins of ``scan_model.ensemble``,
``torch.sigmoid`` and ``scan_model.segmenter._postprocess``. They agree with PyTorch within
float32 rounding on any host (bounds in tests/test_runtime_ops.py), not bit for bit: PyTorch's own
bits depend on its build, the CPU and the device.

The large steps run on ``threads`` threads (default every usable CPU). The thread count changes
no value: work is cut into tasks whose shapes depend on the sizes and the memory budget only, and
every value is computed by the same operations whichever thread runs its task.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .resize import BLOCK, Scratch, Taps, axis_taps, lerp, resize_bilinear, row_bands, run_tasks, thread_count

__all__ = ["upsample_masks", "mask_probabilities", "sigmoid", "ensemble_class_scores", "labels_from_scores"]

F32 = np.float32
_LOG_EPS = 1e-8  # added to the probabilities before the log of the log branch (official)
_SIGMOID_TASK = 16 * BLOCK  # values per sigmoid task: few tasks, each many cache-sized blocks


def upsample_masks(mask_logits: np.ndarray, padded_size: tuple[int, int], image_size: tuple[int, int],
                   threads: int | None = None, budget_bytes: int = 256 << 20) -> np.ndarray:
    """(Q, h, w) logits -> bilinear to ``padded_size``, cropped to ``image_size``: (Q, H, W).
    Twin of ``scan_model.ensemble.upsample_masks``; only the cropped window is computed.
    ``threads`` change no value; their scratch stays under about ``budget_bytes`` (the output not counted)."""
    return _upsample(mask_logits, padded_size, image_size, threads, budget_bytes, finish_negated=None)


def mask_probabilities(mask_logits: np.ndarray, padded_size: tuple[int, int], image_size: tuple[int, int],
                       threads: int | None = None, budget_bytes: int = 256 << 20) -> np.ndarray:
    """``sigmoid(upsample_masks(...))``, bit for bit, in one pass: each block of upsampled logits
    goes through the sigmoid while in cache, and the (Q, H, W) logits never exist. Twin of the
    eager model's ``upsample_masks(...).sigmoid()``."""
    return _upsample(mask_logits, padded_size, image_size, threads, budget_bytes, finish_negated=_sigmoid_of_negated)


def _upsample(mask_logits, padded_size, image_size, threads, budget_bytes, finish_negated) -> np.ndarray:
    height, width = image_size
    if not (0 < height <= padded_size[0] and 0 < width <= padded_size[1]):
        raise ValueError(f"image size {image_size} must fit in the padded size {padded_size}")
    return resize_bilinear(mask_logits, padded_size, rows=slice(0, height), cols=slice(0, width), threads=threads,
                           finish_negated=finish_negated, budget_bytes=budget_bytes)


def sigmoid(x: np.ndarray, out: np.ndarray | None = None, threads: int | None = None) -> np.ndarray:
    """float32 ``1 / (1 + exp(-x))``; ``out=x`` works in place.

    exp(-x) overflows to inf below x = -88.7, giving exactly 0 as in PyTorch: that overflow is
    expected, not reported. Blocks go through the steps while in cache.
    """
    x = np.asarray(x, dtype=F32)
    x = x if x.flags.c_contiguous else np.ascontiguousarray(x)  # (keeps 0-d arrays 0-d)
    out = np.empty_like(x) if out is None else out
    if out.shape != x.shape or out.dtype != F32 or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous float32 array of x's shape")
    flat_in, flat_out = x.reshape(-1), out.reshape(-1)

    def task(first: int, scratch: Scratch) -> None:
        for start in range(first, min(first + _SIGMOID_TASK, flat_in.size), BLOCK):
            part = slice(start, min(start + BLOCK, flat_in.size))
            _sigmoid_of_negated(np.negative(flat_in[part], out=flat_out[part]), flat_out[part])

    run_tasks(task, range(0, flat_in.size, _SIGMOID_TASK), thread_count(threads))
    return out


def _sigmoid_of_negated(negated: np.ndarray, out: np.ndarray) -> None:
    """out = 1 / (1 + exp(negated)) for a contiguous block ``negated`` of -x (overwritten).

    Always a contiguous block: numpy's SIMD exp then serves every value (strided arrays may take
    a scalar exp, whose last bit can differ), so fused and separate sigmoids agree bit for bit.
    """
    with np.errstate(over="ignore", under="ignore"):  # per block: numpy's error state is per thread
        np.exp(negated, out=negated)
        negated += F32(1)
        np.reciprocal(negated, out=out)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ensemble_class_scores(class_logits: np.ndarray, clip_logits: np.ndarray, valid: np.ndarray, weight: float,
                          log_branch: bool = False) -> np.ndarray:
    """(Q, K) class scores from (Q, K+1) in-vocabulary and region-CLIP logits.

    Twin of ``scan_model.ensemble.ensemble_class_scores``: scores are in^(1-w) * out^w; the
    last logit column is the non-object class; rows of invalid queries (empty masks) of
    ``clip_logits`` are ignored. ``log_branch``: the official ADE-847 / PC-459 variant, which
    spreads the in-vocabulary non-object probability back over the classes. Evaluated in
    float64 (Q x K values only) and rounded once: as accurate as float32 allows, on any host.
    """
    probs = _softmax(np.asarray(class_logits, dtype=np.float64))
    in_vocab = probs[:, :-1]
    # The non-object column is dropped *before* the region softmax (as the official code does).
    clip_cls = _softmax(np.asarray(clip_logits, dtype=np.float64)[:, :-1])
    # Queries with an empty mask get probability 1 for every class (official behaviour).
    out_vocab = np.where(np.asarray(valid, dtype=bool)[:, None], clip_cls, 1.0)
    if not log_branch:
        return (in_vocab ** (1.0 - weight) * out_vocab**weight).astype(F32)
    void = probs[:, -1:]
    with np.errstate(divide="ignore"):  # log(0) = -inf is a valid softmax input
        log_scores = (1.0 - weight) * np.log(in_vocab) + weight * np.log(out_vocab)
    with_void = np.concatenate([_softmax(log_scores) * (1.0 - void), void], axis=-1)
    return _softmax(np.log(with_void + _LOG_EPS))[:, :-1].astype(F32)


# -- labels ----------------------------------------------------------------------------------------

# The budget is shared by at most this many tasks at once, each planned for its share whatever
# `threads` is: task shapes (hence the matrix products, hence every value) never depend on it.
_TASKS_IN_FLIGHT = 8
_TILE_PIXELS = 2048  # pixels per matrix product without a resize: 1.2 MB of scores at K = 150 (cache)
_MIN_TILE_PIXELS = 1024  # tiles shrink to this before classes are chunked...
_MIN_SPAN = 4  # ...and bands to this many source rows
_BAND_ROWS = 64  # output rows per band at most
# Per output pixel of a task: the argmax index and the two int64 indices of its gather, the
# value, the comparison, and the running maximum where the caller gives no label_scores.
_PIXEL_BYTES = 8 + 16 + 4 + 1 + 4


@dataclass(frozen=True)
class LabelPlan:
    """How `labels_from_scores` cuts its work: ``parts`` are tiles of flat pixels (no resize) or
    bands of output rows, each a task that loops over classes in chunks of ``chunk``."""

    parts: list[slice]
    chunk: int
    task_bytes: int  # working memory of the largest task

    def workers(self, threads: int, budget: int) -> int:
        """Tasks run at once: no more than the budget holds, nor than `_TASKS_IN_FLIGHT`."""
        return max(1, min(threads, _TASKS_IN_FLIGHT, budget // max(1, self.task_bytes)))


def plan_labels(in_size: tuple[int, int], out_size: tuple[int, int], classes: int, budget: int) -> LabelPlan:
    """Tiles or bands, and classes per chunk, whose tasks fit a share of ``budget`` bytes."""
    share = budget // _TASKS_IN_FLIGHT
    if tuple(in_size) == tuple(out_size):
        return _plan_tiles(out_size[0] * out_size[1], classes, share)
    return _plan_bands(axis_taps(in_size[0], out_size[0]), in_size, out_size, classes, share)


def _tile_bytes(pixels: int, chunk: int) -> int:
    return pixels * (4 * chunk + _PIXEL_BYTES)


def _plan_tiles(pixels: int, classes: int, share: int) -> LabelPlan:
    """Tiles shrink first (to `_MIN_TILE_PIXELS`), then chunks, then tiles again."""
    tile, chunk = min(pixels, _TILE_PIXELS), classes
    while _tile_bytes(tile, chunk) > share and (tile > 1 or chunk > 1):
        if tile > _MIN_TILE_PIXELS or chunk == 1:
            tile = -(-tile // 2)
        else:
            chunk = -(-chunk // 2)
    tiles = [slice(start, min(start + tile, pixels)) for start in range(0, pixels, tile)]
    return LabelPlan(tiles, chunk, _tile_bytes(tile, chunk))


def _band_bytes(span: int, rows: int, chunk: int, in_width: int, out_width: int) -> int:
    """The scores of the source rows and their width-resized copy (if resized), the width pass's
    second tap and two output rows being interpolated (a row each), and the per-pixel buffers of a
    row and the band."""
    resized = 0 if in_width == out_width else out_width
    return 4 * chunk * (span * (in_width + resized) + 3 * out_width) + out_width * (_PIXEL_BYTES + 4 * rows)


def _plan_bands(row_taps: Taps, in_size, out_size, classes: int, share: int) -> LabelPlan:
    """Bands as tall as `_BAND_ROWS` that fit with all classes; chunks of classes halve while the
    bands would read fewer than `_MIN_SPAN` source rows (neighbours re-read a row or two)."""
    (in_h, in_w), (_, out_w) = in_size, out_size
    chunk = classes
    while True:
        fixed = _band_bytes(0, _BAND_ROWS, chunk, in_w, out_w)
        per_source_row = _band_bytes(1, 0, chunk, in_w, out_w) - _band_bytes(0, 0, chunk, in_w, out_w)
        max_span = (share - fixed) // per_source_row
        if max_span >= min(_MIN_SPAN, in_h) or chunk == 1:
            break
        chunk = -(-chunk // 2)
    bands = row_bands(row_taps, _BAND_ROWS, max(1, max_span))
    spans = [row_taps.window(band).span() for band in bands]
    largest = max(_band_bytes(s.stop - s.start, b.stop - b.start, chunk, in_w, out_w) for s, b in zip(spans, bands))
    return LabelPlan(bands, chunk, largest)


def labels_from_scores(scores: np.ndarray, probs: np.ndarray, out_size: tuple[int, int], keep_scores: bool = False,
                       budget_bytes: int = 256 << 20, label_scores: np.ndarray | None = None,
                       threads: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W) int64 argmax over classes of the semantic map resized to ``out_size``, and the
    resized (K, H, W) float32 map if ``keep_scores`` (else None). ``label_scores``, a C-contiguous
    (H, W) float32 array if given, receives each pixel's winning score.

    Twin of ``scan_model.segmenter._postprocess(semantic_map(scores, probs), out_size, keep_scores)``
    (``semantic_map`` from ``scan_model.ensemble``) for (Q, K) scores and (Q, h, w) probabilities;
    out_size (h, w) means no
    resize (as in PyTorch, a bilinear resize to the same size is the identity). The map is made
    pixel-major (pixels x Q @ Q x K), by tiles of pixels or bands of output rows and chunks of
    classes, so that working memory stays under about ``budget_bytes`` whatever K and the output
    size (outputs not counted), and so that each pixel's classes are contiguous: the argmax is
    numpy's, the first maximum (a NaN counts as the maximum, as in torch's max), and chunks fold
    into a running maximum with a strict ``>`` (ties keep the first class). ``threads``: tasks
    run at once (default every usable CPU); the matrix products also use numpy's BLAS threads.
    """
    scores, probs = np.asarray(scores, dtype=F32), np.ascontiguousarray(probs, dtype=F32)
    if scores.ndim != 2 or probs.ndim != 3 or probs.shape[0] != scores.shape[0] or scores.shape[1] < 1:
        raise ValueError(f"probs {probs.shape} and scores {scores.shape} must be (Q, h, w) and (Q, K >= 1)")
    out_size = tuple(int(n) for n in out_size)
    if min(out_size) < 1:
        raise ValueError(f"output size must be positive, got {out_size}")
    if label_scores is not None and (label_scores.shape != out_size or label_scores.dtype != F32
                                     or not label_scores.flags.c_contiguous):
        raise ValueError(f"label_scores must be a C-contiguous float32 array of shape {out_size}")
    classes = scores.shape[1]
    plan = plan_labels(probs.shape[1:], out_size, classes, budget_bytes)
    job = _LabelJob(
        probs=probs,
        score_chunks=[(first, np.ascontiguousarray(scores[:, first : first + plan.chunk]))
                      for first in range(0, classes, plan.chunk)],
        row_taps=axis_taps(probs.shape[1], out_size[0]), col_taps=axis_taps(probs.shape[2], out_size[1]),
        labels=np.empty(out_size, dtype=np.int64),
        kept=np.empty((classes, *out_size), dtype=F32) if keep_scores else None,
        label_scores=label_scores,
    )
    task = job.tile if tuple(probs.shape[1:]) == out_size else job.band
    run_tasks(task, plan.parts, plan.workers(thread_count(threads), budget_bytes))
    return job.labels, job.kept


@dataclass(frozen=True)
class _LabelJob:
    """One `labels_from_scores` call: its inputs and outputs, and its two kinds of task."""

    probs: np.ndarray  # (Q, h, w)
    score_chunks: list[tuple[int, np.ndarray]]  # (first class, contiguous (Q, chunk) scores)
    row_taps: Taps
    col_taps: Taps
    labels: np.ndarray  # (H, W) int64
    kept: np.ndarray | None  # (K, H, W) float32, if kept
    label_scores: np.ndarray | None  # (H, W) float32, if asked

    def tile(self, tile: slice, scratch: Scratch) -> None:
        """Pixels ``tile`` of the flattened image, at the model's size (no resize)."""
        queries, pixels = self.probs.shape[0], tile.stop - tile.start
        source = self.probs.reshape(queries, -1)[:, tile].T  # BLAS reads the transpose in place
        labels = self.labels.reshape(-1)[tile]
        best = scratch.array("best", (pixels,)) if self.label_scores is None else self.label_scores.reshape(-1)[tile]
        for first, scores in self.score_chunks:
            values = np.matmul(source, scores, out=scratch.array("scores", (pixels, scores.shape[1])))
            _fold_first_max(values, first, labels, best, scratch)
            if self.kept is not None:
                self.kept.reshape(self.kept.shape[0], -1)[first : first + scores.shape[1], tile] = values.T

    def band(self, band: slice, scratch: Scratch) -> None:
        """Output rows ``band``: the scores of the source rows it reads, resized to the output
        width, then each output row interpolated between two of those rows and folded."""
        (queries, _, width), out_w = self.probs.shape, self.labels.shape[1]
        span = self.row_taps.window(band).span()
        rows = span.stop - span.start
        source = self.probs[:, span].reshape(queries, -1).T  # (rows * width, Q), read in place
        taps = self.row_taps.window(band, span.start)
        shape = (band.stop - band.start, out_w)
        best = scratch.array("best", shape) if self.label_scores is None else self.label_scores[band]
        for first, scores in self.score_chunks:
            chunk = scores.shape[1]
            values = np.matmul(source, scores, out=scratch.array("scores", (rows * width, chunk)))
            wide = self._width_pass(values.reshape(rows, width, chunk), scratch)
            for i, y in enumerate(range(band.start, band.stop)):
                row = wide[taps.lo[i]] if self.row_taps.identity else _lerp_rows(wide, taps, i, scratch)
                _fold_first_max(row, first, self.labels[y], best[i], scratch)
                if self.kept is not None:
                    self.kept[first : first + chunk, y] = row.T

    def _width_pass(self, values: np.ndarray, scratch: Scratch) -> np.ndarray:
        """(rows, w, chunk) -> (rows, W, chunk): whole chunk-long pixels lerped at once, a row at
        a time (the second tap's scratch is then one row, not a second copy of the band)."""
        if self.col_taps.identity:
            return values
        wide = scratch.array("wide", (values.shape[0], self.col_taps.lo.size, values.shape[2]))
        upper = scratch.array("wide_hi", wide.shape[1:])
        for row, out in zip(values, wide):
            lerp(row, self.col_taps, 0, out, upper)
        return wide


def _lerp_rows(wide: np.ndarray, taps: Taps, i: int, scratch: Scratch) -> np.ndarray:
    """Output row ``i`` of the height pass: two whole (W, chunk) source rows, no gather."""
    lower = np.multiply(wide[taps.lo[i]], taps.w_lo[i], out=scratch.array("lower", wide.shape[1:]))
    upper = np.multiply(wide[taps.hi[i]], taps.w_hi[i], out=scratch.array("upper", wide.shape[1:]))
    return np.add(lower, upper, out=lower)


def _fold_first_max(values: np.ndarray, first_class: int, labels: np.ndarray, best: np.ndarray,
                    scratch: Scratch) -> None:
    """Fold (n, c) ``values`` of classes ``first_class``.. into the running first maximum:
    (n,) ``labels`` and ``best`` (written, for the first chunk)."""
    index = np.argmax(values, axis=1, out=scratch.array("index", (values.shape[0],), np.int64))
    top = np.take_along_axis(values, index[:, None], axis=1)[:, 0]
    if first_class == 0:
        labels[...], best[...] = index, top
        return
    better = np.greater(top, best, out=scratch.array("better", top.shape, bool))  # an equal later class does not win
    index += first_class
    np.copyto(best, top, where=better)
    np.copyto(labels, index, where=better)

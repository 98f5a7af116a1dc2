"""The eager model's post-processing in numpy, torch-free (SPEC §1.10, §1.13, §1.14): twins of
``scan_model.ensemble``, ``torch.sigmoid`` and ``scan_model.segmenter._postprocess``. They agree
with PyTorch within float32 rounding on any host (bounds in tests/test_runtime_ops.py), not bit
for bit: PyTorch's own bits depend on its build, the CPU and the device.
"""

from __future__ import annotations

import numpy as np

from .resize import BLOCK, axis_taps, height_blocks, resize_bilinear, width_pass

__all__ = ["upsample_masks", "sigmoid", "ensemble_class_scores", "semantic_map", "labels_from_scores"]

F32 = np.float32
_LOG_EPS = 1e-8  # added to the probabilities before the log of the log branch (official)


def upsample_masks(mask_logits: np.ndarray, padded_size: tuple[int, int], image_size: tuple[int, int]) -> np.ndarray:
    """(Q, h, w) logits -> bilinear to ``padded_size``, cropped to ``image_size``: (Q, H, W).
    Twin of ``scan_model.ensemble.upsample_masks``; only the cropped window is computed."""
    height, width = image_size
    if not (0 < height <= padded_size[0] and 0 < width <= padded_size[1]):
        raise ValueError(f"image size {image_size} must fit in the padded size {padded_size}")
    return resize_bilinear(mask_logits, padded_size, rows=slice(0, height), cols=slice(0, width))


def sigmoid(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """float32 ``1 / (1 + exp(-x))``; ``out=x`` works in place.

    exp(-x) overflows to inf below x = -88.7, giving exactly 0 as in PyTorch: that overflow is
    expected, not reported. Blocks go through the four steps while in cache.
    """
    x = np.asarray(x, dtype=F32)
    x = x if x.flags.c_contiguous else np.ascontiguousarray(x)  # (keeps 0-d arrays 0-d)
    out = np.empty_like(x) if out is None else out
    if out.shape != x.shape or out.dtype != F32 or not out.flags.c_contiguous:
        raise ValueError("out must be a C-contiguous float32 array of x's shape")
    flat_in, flat_out = x.reshape(-1), out.reshape(-1)
    with np.errstate(over="ignore", under="ignore"):
        for start in range(0, flat_in.size, BLOCK):
            block = np.negative(flat_in[start : start + BLOCK], out=flat_out[start : start + BLOCK])
            np.exp(block, out=block)
            block += F32(1)
            np.reciprocal(block, out=block)
    return out


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def ensemble_class_scores(class_logits: np.ndarray, clip_logits: np.ndarray, valid: np.ndarray, weight: float,
                          log_branch: bool = False) -> np.ndarray:
    """(Q, K) class scores from (Q, K+1) in-vocabulary and region-CLIP logits (SPEC §1.13).

    Twin of ``scan_model.ensemble.ensemble_class_scores``: scores are in^(1-w) * out^w; the
    last logit column is the non-object class; rows of invalid queries (empty masks) of
    ``clip_logits`` are ignored. ``log_branch``: the official ADE-847 / PC-459 variant, which
    spreads the in-vocabulary non-object probability back over the classes. Evaluated in
    float64 (Q x K values only) and rounded once: as accurate as float32 allows, on any host.
    """
    probs = _softmax(np.asarray(class_logits, dtype=np.float64))
    in_vocab = probs[:, :-1]
    # The non-object column is dropped *before* the region softmax (SPEC §8 B13).
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


def semantic_map(scores: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """sum_q scores[q, c] * probs[q]: (Q, K) x (Q, h, w) -> (K, h, w) float32, one matrix product."""
    probs = np.asarray(probs, dtype=F32)
    return (np.asarray(scores, dtype=F32).T @ probs.reshape(probs.shape[0], -1)).reshape(-1, *probs.shape[1:])


def labels_from_scores(scores: np.ndarray, probs: np.ndarray, out_size: tuple[int, int], keep_scores: bool = False,
                       budget_bytes: int = 256 << 20, label_scores: np.ndarray | None = None,
                       ) -> tuple[np.ndarray, np.ndarray | None]:
    """(H, W) int64 argmax over classes of the semantic map resized to ``out_size`` (SPEC §1.14),
    and the resized (K, H, W) float32 map if ``keep_scores`` (else None). ``label_scores``, an
    (H, W) float32 array if given, receives each pixel's winning score (the running maximum).

    Twin of ``scan_model.segmenter._postprocess(semantic_map(scores, probs), out_size,
    keep_scores)`` for (Q, K) scores and (Q, h, w) probabilities; out_size (h, w) means no
    resize. The map is made by bands of output rows and chunks of classes, folded into a
    running maximum (strict ``>``: ties keep the first class, as argmax), so working memory
    stays under about ``budget_bytes`` whatever K and the output size (outputs not counted).
    """
    scores, probs = np.asarray(scores, dtype=F32), np.ascontiguousarray(probs, dtype=F32)
    if scores.ndim != 2 or probs.ndim != 3 or probs.shape[0] != scores.shape[0] or scores.shape[1] < 1:
        raise ValueError(f"probs {probs.shape} and scores {scores.shape} must be (Q, h, w) and (Q, K >= 1)")
    out_h, out_w = (int(n) for n in out_size)
    if min(out_h, out_w) < 1:
        raise ValueError(f"output size must be positive, got {out_size}")
    (queries, classes), (_, height, width) = scores.shape, probs.shape
    row_taps, col_taps = axis_taps(height, out_h), axis_taps(width, out_w)
    band_rows, chunk, block = _plan(row_taps, classes, width, out_w, budget_bytes)
    flat = probs.reshape(queries, -1)
    labels = np.empty((out_h, out_w), dtype=np.int64)
    kept = np.empty((classes, out_h, out_w), dtype=F32) if keep_scores else None
    best_rows = np.empty((band_rows, out_w), dtype=F32)  # a band's running maximum
    scratch = np.empty(block, dtype=bool), np.empty(block, dtype=np.uint16)
    for first_row in range(0, out_h, band_rows):
        band = slice(first_row, min(first_row + band_rows, out_h))
        span = row_taps.window(band).span()
        taps, best = row_taps.window(band, span.start), best_rows[: band.stop - first_row]
        for first_class in range(0, classes, chunk):
            part = slice(first_class, min(first_class + chunk, classes))
            sem = scores[:, part].T @ flat[:, span.start * width : span.stop * width]
            horizontal = width_pass(sem.reshape(-1, span.stop - span.start, width), col_taps)
            del sem  # freed now unless `horizontal` is a view of it (no width resize)
            for rows, values in height_blocks(horizontal, taps, kept[part, band] if keep_scores else None, block):
                index, top = _first_max(values, *scratch)
                index += first_class
                band_best, band_labels = best[rows], labels[band][rows]
                if first_class == 0:
                    band_best[...], band_labels[...] = top, index
                else:
                    better = top > band_best  # strictly: an equal later class does not win
                    np.copyto(band_best, top, where=better)
                    np.copyto(band_labels, index, where=better)
            del horizontal  # before the next chunk's is made
        if label_scores is not None:
            label_scores[band] = best
    return labels, kept


def _first_max(values: np.ndarray, equal: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(b, W) index and value of the first maximum over axis 0 of (C, b, W) values, as argmax.

    Vectorised over classes (a loop would cost numpy calls per class): the top value, then the
    first class equal to it as the largest C - c among those. ``equal``, ``rank``: scratch.
    """
    classes, shape = values.shape[0], values.shape
    top = values.max(axis=0)
    equal = np.equal(values, top, out=equal[: values.size].reshape(shape))
    reverse = np.arange(classes, 0, -1, dtype=np.uint16)[:, None, None]
    rank = np.multiply(equal, reverse, out=rank[: values.size].reshape(shape)).max(axis=0)
    # A NaN top equals nothing (rank 0): clipped to a valid class (PyTorch would pick the NaN).
    return np.minimum(classes - rank.astype(np.int64), classes - 1), top


def _plan(row_taps, classes: int, width: int, out_w: int, budget: int) -> tuple[int, int, int]:
    """Output rows per band, classes per chunk and values per block that fit ``budget`` bytes.

    Per (band, chunk): the semantic map on the band's source rows, its width-resized copy, the
    band's maximum; per block (>= a row of each class, enough values to amortise numpy calls, a
    small part of the budget): 11 bytes per value (height pass, `_first_max`), < 24 per pixel.
    Bands shrink first (to 64 rows: neighbours re-read a source row or two), then chunks
    (< 2**16 for uint16 ranks), then bands.
    """
    out_h, resized_w = row_taps.lo.size, 0 if width == out_w else out_w

    def cost(rows: int, chunk: int) -> tuple[int, int]:
        starts = np.arange(0, out_h, rows)
        span = int((row_taps.hi[np.minimum(starts + rows, out_h) - 1] - row_taps.lo[starts]).max()) + 1
        block = max(min(1 << 18, budget // 64), chunk * out_w)
        return 4 * chunk * span * (width + resized_w) + 11 * block + 24 * (block // chunk) + 4 * rows * out_w, block

    rows, chunk = out_h, min(classes, (1 << 16) - 1)
    while cost(rows, chunk)[0] > budget and (rows > 1 or chunk > 1):
        if rows > 64 or chunk == 1:
            rows = -(-rows // 2)
        else:
            chunk = -(-chunk // 2)
    return rows, chunk, cost(rows, chunk)[1]

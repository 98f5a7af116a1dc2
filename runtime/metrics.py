"""Semantic-segmentation metrics with the official SCAN conventions (SPEC 5.4, 5.5).

A `ConfusionMatrix` accumulates M[pred, gt] over images; `segmentation_metrics` turns it into
mIoU / fwIoU / mACC / pACC and `sg_iou_metrics` into the synonym-aware SG-IoU variants.
Numpy only: this module sits in the torch-free runtime layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

import numpy as np

from .errors import ScanError


class MetricsError(ScanError, ValueError):
    """Inputs the metrics cannot use; the message names the bad value and the fix."""


class ConfusionMatrix:
    """Accumulates M[pred, gt] of size (K+1, K+1); ground truth equal to the ignore label goes to index K (SPEC 5.4)."""

    def __init__(self, num_classes: int, ignore_label: int | None = 255):
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise MetricsError(f"num_classes must be a positive integer, got {num_classes!r}")
        # An ignore label inside [0, K) would silently drop a real class from the evaluation.
        if ignore_label is not None and 0 <= ignore_label < num_classes:
            raise MetricsError(
                f"ignore label {ignore_label} is a real class id for K={num_classes}; "
                f"use a value outside [0, {num_classes}) such as 255 or 65535"
            )
        self.num_classes = int(num_classes)
        self.ignore_label = ignore_label
        self.matrix = np.zeros((self.num_classes + 1,) * 2, dtype=np.int64)

    def update(self, pred: np.ndarray, gt: np.ndarray) -> None:
        """Add one image: `pred` holds class ids in [0, K), `gt` class ids or the ignore label."""
        pred, gt = np.asarray(pred), np.asarray(gt)
        k = self.num_classes
        if pred.shape != gt.shape:
            raise MetricsError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}; "
                               "resize the prediction to the label's size before scoring")
        for name, arr in (("prediction", pred), ("ground truth", gt)):
            if not np.issubdtype(arr.dtype, np.integer):
                raise MetricsError(f"{name} must be an integer class-id array, got dtype {arr.dtype}")
        if pred.size == 0:
            return
        # Widen first: comparisons and (K+1)*pred must not wrap in uint8/uint16.
        pred, gt = pred.astype(np.int64).ravel(), gt.astype(np.int64).ravel()
        bad_pred = (pred < 0) | (pred >= k)
        if bad_pred.any():
            raise MetricsError(f"prediction value {pred[bad_pred][0]} is outside [0, {k}); "
                               f"predictions must be class ids of the K={k} evaluated classes")
        ignored = gt == self.ignore_label if self.ignore_label is not None else np.zeros_like(gt, dtype=bool)
        bad_gt = ~(((gt >= 0) & (gt < k)) | ignored)
        if bad_gt.any():
            raise MetricsError(f"ground-truth value {gt[bad_gt][0]} is neither in [0, {k}) nor the ignore label "
                               f"{self.ignore_label}; check the dataset's K and ignore label (SPEC 5.1)")
        gt = np.where(ignored, k, gt)
        counts = np.bincount((k + 1) * pred + gt, minlength=(k + 1) ** 2)
        self.matrix += counts.reshape(k + 1, k + 1)

    def merge(self, other: ConfusionMatrix) -> None:
        """Add another matrix's counts (e.g. from another worker); both must have the same K."""
        if not isinstance(other, ConfusionMatrix):
            raise MetricsError(f"can only merge a ConfusionMatrix, got {type(other).__name__}")
        if other.num_classes != self.num_classes:
            raise MetricsError(
                f"cannot merge a K={other.num_classes} confusion matrix into a K={self.num_classes} one; "
                "accumulate each dataset separately"
            )
        self.matrix += other.matrix

    @classmethod
    def from_matrix(cls, matrix: np.ndarray, ignore_label: int | None = 255) -> ConfusionMatrix:
        """Wrap saved counts of shape (K+1, K+1)."""
        m = _check_matrix(matrix)
        cm = cls(m.shape[0] - 1, ignore_label)
        cm.matrix = m.copy()
        return cm


def _check_matrix(matrix: np.ndarray | ConfusionMatrix) -> np.ndarray:
    m = np.asarray(matrix.matrix if isinstance(matrix, ConfusionMatrix) else matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] < 2:
        raise MetricsError(f"confusion matrix must be square of size (K+1, K+1) with K >= 1, got shape {m.shape}")
    if not np.issubdtype(m.dtype, np.integer) or (m < 0).any():
        raise MetricsError(f"confusion matrix must hold non-negative integer counts, got dtype {m.dtype}")
    return m.astype(np.int64)


@dataclass(frozen=True)
class _Counts:
    """Per-class counts over the first K rows/columns: the ignore row/column K never enters a metric."""

    m: np.ndarray  # (K, K) float64, M[pred, gt]
    tp: np.ndarray
    pos_gt: np.ndarray
    pos_pred: np.ndarray

    @classmethod
    def of(cls, matrix: np.ndarray | ConfusionMatrix) -> _Counts:
        full = _check_matrix(matrix)
        m = full[:-1, :-1].astype(np.float64)
        counts = cls(m, np.diag(m).copy(), m.sum(axis=0), m.sum(axis=1))
        if counts.pos_gt.sum() == 0:
            raise MetricsError("no labelled pixels in the confusion matrix: every ground-truth pixel was ignored "
                               "or nothing was accumulated; check the labels and the ignore label")
        return counts


def _scores(tp: np.ndarray, c: _Counts) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """mIoU/fwIoU/mACC/pACC (x100) with numerator `tp`; the union always uses the plain tp (SPEC 5.5)."""
    present = c.pos_gt > 0
    union = c.pos_gt + c.pos_pred - c.tp
    iou = np.full(tp.shape, np.nan)
    acc = np.full(tp.shape, np.nan)
    iou[present] = tp[present] / union[present]
    acc[present] = tp[present] / c.pos_gt[present]
    # Old detectron2 convention (SPEC 8 B10): classes predicted but absent from the GT count as 0 in mIoU.
    seen = np.count_nonzero(c.pos_gt + c.pos_pred > 0)
    weights = c.pos_gt[present] / c.pos_gt.sum()
    summary = {
        "mIoU": 100.0 * float(iou[present].sum() / seen),
        "fwIoU": 100.0 * float((iou[present] * weights).sum()),
        "mACC": 100.0 * float(acc[present].mean()),
        "pACC": 100.0 * float(tp.sum() / c.pos_gt.sum()),
    }
    return summary, iou, acc


def _per_class(iou: np.ndarray, acc: np.ndarray, c: _Counts, class_names: list[str] | None) -> list[dict]:
    k = len(c.tp)
    if class_names is not None and len(class_names) != k:
        raise MetricsError(f"{len(class_names)} class names for a K={k} confusion matrix; pass one name per class")
    names = list(class_names) if class_names is not None else list(range(k))
    return [
        {
            "class": names[i],
            "IoU": None if np.isnan(iou[i]) else 100.0 * float(iou[i]),
            "ACC": None if np.isnan(acc[i]) else 100.0 * float(acc[i]),
            "gt_pixels": int(c.pos_gt[i]),
            "pred_pixels": int(c.pos_pred[i]),
        }
        for i in range(k)
    ]


def segmentation_metrics(matrix: np.ndarray, class_names: list[str] | None = None) -> dict:
    """Standard metrics (x100) of a (K+1, K+1) M[pred, gt] matrix; "pixels" counts labelled GT pixels."""
    c = _Counts.of(matrix)
    summary, iou, acc = _scores(c.tp, c)
    per_class = _per_class(iou, acc, c, class_names)
    return {**summary, "per_class": per_class, "num_classes": len(c.tp), "pixels": int(c.pos_gt.sum())}


def sg_iou_metrics(matrix: np.ndarray, fathers: dict[int, list[int]], class_names: list[str] | None = None) -> dict:
    """SG-IoU metrics (x100): GT-c pixels predicted as a father f of c count as tp, weighted by beta (SPEC 5.5)."""
    c = _Counts.of(matrix)
    k = len(c.tp)
    tp_sg = c.tp.copy()
    for child, fs in fathers.items():
        for f in [fs] if isinstance(fs, (int, np.integer)) else fs:
            if not (0 <= child < k and 0 <= f < k):
                raise MetricsError(f"SG-IoU synonym map does not fit K={k}: {child} -> {f} is outside [0, {k}); "
                                   "use the map of the evaluated dataset (synonym_map) or none")
            if f == child:
                raise MetricsError(f"SG-IoU synonym map lists class {child} as its own father; remove that entry")
            # beta: share of all f-predictions that land on GT c or f; 1 when f is never predicted.
            beta = (c.m[f, child] + c.m[f, f]) / c.pos_pred[f] if c.pos_pred[f] > 0 else 1.0
            tp_sg[child] += c.m[f, child] * beta
    summary, iou, acc = _scores(tp_sg, c)
    return {**{f"SG-{key}": value for key, value in summary.items()},
            "per_class": _per_class(iou, acc, c, class_names)}


@lru_cache(maxsize=1)
def _sgiou_maps() -> dict[str, dict[str, list[int] | int]]:
    text = resources.files("runtime").joinpath("data/sgiou_maps.json").read_text()
    return json.loads(text)["maps"]


def synonym_map(dataset: str) -> dict[int, list[int]] | None:
    """The SG-IoU father map of "ade150", "ade847" or "pc459" (trainIds); None for other datasets.

    Only the ade847 map is active in the official evaluator; the other two are shipped there
    but disabled, so SG-IoU numbers on them are ours, not the paper's.
    """
    raw = _sgiou_maps().get(dataset)
    if raw is None:
        return None
    # A fresh dict each call: callers may edit it without touching the cached package data.
    return {int(k): [int(v)] if isinstance(v, int) else [int(x) for x in v] for k, v in raw.items()}

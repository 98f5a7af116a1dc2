"""Evaluating a segmenter on a dataset: the confusion matrix and the report (SPEC §5.2-§5.5).

Torch-free, so a deployed bundle is measured with the same loop and the same metrics as the
eager model. Any object with `set_vocabulary(names)` and `segment(image, settings=...)`
returning a label map at the image's size will do (`runtime.Segmenter`, the eager one).
Under several processes each rank takes every `world`-th image; the caller sums the matrices.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from .datasets import SegmentationDataset
from .metrics import ConfusionMatrix, segmentation_metrics, sg_iou_metrics, synonym_map
from .settings import InferenceSettings


@dataclass
class EvalRun:
    matrix: ConfusionMatrix
    images: int
    seconds: float


def evaluate(segmenter, dataset: SegmentationDataset, settings: InferenceSettings, rank: int = 0, world: int = 1,
             progress: bool = False) -> EvalRun:
    """Segment this rank's share of `dataset` and accumulate M[pred, gt] (ignored pixels to row K)."""
    segmenter.set_vocabulary(list(dataset.class_names))
    matrix = ConfusionMatrix(len(dataset.class_names), dataset.ignore_label)
    indices = range(rank, len(dataset), world)
    start = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(indices), desc="eval", unit="img", file=sys.stderr, dynamic_ncols=True)
    for index in indices:
        image, label = dataset.read(index)
        result = segmenter.segment(image, settings=settings)
        matrix.update(result.label_map, label)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return EvalRun(matrix, len(indices), time.perf_counter() - start)


def report(matrix: ConfusionMatrix, dataset: SegmentationDataset, settings: InferenceSettings) -> dict:
    """The standard metrics, SG-IoU where the dataset's vocabulary has a synonym map, and the settings."""
    names = list(dataset.class_names)
    result = {
        "dataset": dataset.name,
        "split": dataset.split,
        "images": len(dataset),
        "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__},
        **segmentation_metrics(matrix.matrix, names),
    }
    fathers = synonym_map(dataset.benchmark) if dataset.benchmark else None
    if fathers is not None:
        result["sg_iou"] = sg_iou_metrics(matrix.matrix, fathers, names)
    return result


def summary_lines(result: dict) -> list[str]:
    lines = [f"{result['dataset']} ({result['split']}, {result['images']} images): "
             f"mIoU {result['mIoU']:.2f}  fwIoU {result['fwIoU']:.2f}  mACC {result['mACC']:.2f}  pACC {result['pACC']:.2f}"]
    if "sg_iou" in result:
        sg = result["sg_iou"]
        lines.append(f"SG-IoU: SG-mIoU {sg['SG-mIoU']:.2f}  SG-fwIoU {sg['SG-fwIoU']:.2f}  SG-mACC {sg['SG-mACC']:.2f}  "
                     f"SG-pACC {sg['SG-pACC']:.2f}")
    return lines

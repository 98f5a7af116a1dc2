"""Reduced precision on a trained model: mIoU and label agreement with eager fp32, per backend.

Random weights leave near-ties between classes everywhere, so bf16 and int8 are judged on a
trained checkpoint and its bundle (exported with `--precision int8`): every backend segments
the dataset split; the mIoU of each, and the share of pixels whose label equals eager fp32's
(over the split, and at the worst image), go to one JSON.

    python -m benchmarks.precision_quality --checkpoint run/model_final.safetensors --bundle b8 \
        --dataset data --split val --json benchmarks/results/precision_quality_tiny.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.common import report
from benchmarks.machine import machine, versions

BACKENDS = ("onnxruntime-fp32", "onnxruntime-int8", "openvino-fp32", "openvino-bf16", "openvino-int8")


def main(argv=None) -> dict:
    import torch

    from runtime.datasets import open_dataset
    from runtime.metrics import ConfusionMatrix, segmentation_metrics
    from runtime.segmenter import Segmenter
    from scan_model.loading import load_model
    from scan_model.segmenter import EagerSegmenter

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dataset = open_dataset(args.dataset, split=args.split)
    segmenters = {"eager": EagerSegmenter(load_model(args.checkpoint, None, device="cpu").model)}
    for name in args.backends.split(","):
        backend, precision = name.split("-")
        segmenters[name] = Segmenter(args.bundle, backend=backend, precision=precision, threads=args.threads,
                                     report=lambda line: None)
    matrices = {name: ConfusionMatrix(dataset.num_classes, dataset.ignore_label) for name in segmenters}
    same = {name: [] for name in segmenters if name != "eager"}
    for segmenter in segmenters.values():
        segmenter.set_vocabulary(dataset.class_names)
    for index in range(len(dataset)):
        image, label = dataset.read(index)
        eager = None
        for name, segmenter in segmenters.items():
            labels = segmenter.segment(image).label_map
            matrices[name].update(labels, label)
            if name == "eager":
                eager = labels
            else:
                same[name].append(((labels == eager).sum(), eager.size))
    metrics = {name: segmentation_metrics(m.matrix, dataset.class_names) for name, m in matrices.items()}
    rows = {}
    for name in segmenters:
        row = {"mIoU": round(metrics[name]["mIoU"], 3), "mIoU_minus_eager": round(metrics[name]["mIoU"] - metrics["eager"]["mIoU"], 3)}
        if name in same:
            counts = np.asarray(same[name], dtype=np.float64)
            row["label_agreement"] = round(float(counts[:, 0].sum() / counts[:, 1].sum()), 6)
            row["worst_image_agreement"] = round(float((counts[:, 0] / counts[:, 1]).min()), 6)
            row["notes"] = segmenters[name].notes
        rows[name] = row
    result = {
        "what": "mIoU and label agreement with eager fp32 of each backend on a trained model's dataset split",
        "checkpoint": str(args.checkpoint), "bundle": str(args.bundle), "dataset": dataset.name, "split": args.split,
        "images": len(dataset), "threads": args.threads, "backends": rows, "machine": machine(), "versions": versions(),
    }
    report(result, args.json)
    return result


if __name__ == "__main__":
    main()

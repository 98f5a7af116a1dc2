"""Export every piece of a preset and report op count, file size, export time and parity.

Random weights by default (the numbers describe the graphs, not a trained model). The ONNX
files go to a temporary folder and are removed afterwards; only the report is kept.

    python -m benchmarks.export_report --preset vitb --shape 320x480 --classes 10 --masks 8 \
        --json benchmarks/results/export_vitb.json
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import parse_size, report


def measure(preset: str, shapes: list[tuple[int, int]], classes: int, masks: int, threads: int, seed: int = 0) -> dict:
    import onnx
    import onnxruntime
    import torch

    from export.onnx_export import Shape, export_all
    from scan_model.loading import load_model

    torch.set_num_threads(threads)
    model = load_model(None, preset, device="cpu", seed=seed).model
    points = [Shape(h, w, classes + 3 * i, masks + 2 * i) for i, (h, w) in enumerate(shapes)]
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        records = export_all(model, Path(tmp), points[0], points[1:])
        pieces = {
            name: {
                "op_count": r.op_count,
                "file_mb": round(r.path.stat().st_size / 1e6, 1),
                "export_s": round(r.seconds, 1),
                "parity": [{"shape": p.shape, "max_rel": p.max_rel, "max_abs": p.max_abs} for p in r.parity],
                "worst_rel": r.worst_rel(),
            }
            for name, r in records.items()
        }
    return {
        "preset": preset,
        "weights": "random (seed %d)" % seed,
        "threads": threads,
        "total_s": round(time.perf_counter() - start, 1),
        "pieces": pieces,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "cpu": platform.processor() or platform.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--shape", action="append", type=parse_size, help="HxW (multiples of 32); repeat for more shapes")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--masks", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    report(measure(args.preset, args.shape or [(320, 480)], args.classes, args.masks, args.threads), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

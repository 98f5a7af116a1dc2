"""Export every piece of a preset and report op count, file size, export time and parity.

Random weights by default (the numbers describe the graphs, not a trained model). The bundle
is written to a temporary folder and removed afterwards; only the report is kept.

Beside each piece's parity (ONNX Runtime against eager, per shape and output) the report gives
eager's sensitivity, measured by the export itself (`export.onnx_export.ort_parity`): how
far eager's own outputs move when its float inputs get 1e-7 relative noise (float rounding). A
parity value of that size is the model's conditioning (e.g. masked-attention blocks at
`sigmoid == 0.5` flipping), not a difference introduced by the export; the per-piece gate
accepts up to `SENSITIVITY_MULTIPLE` times it. The end-to-end gate (the runtime's labels
against eager's on drawn scenes) is reported as `pipeline_vs_eager`.

    python -m benchmarks.export_report --preset vitb --shape 320x480 --classes 10 --masks 8 \
        --json benchmarks/results/export_vitb.json
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import parse_size, report


def measure(preset: str, shapes: list[tuple[int, int]], classes: int, masks: int, threads: int, seed: int = 0) -> dict:
    import onnx
    import onnxruntime
    import torch

    from export.bundle import write_bundle
    from export.onnx_export import SENSITIVITY_MULTIPLE, SENSITIVITY_NOISE, Shape
    from scan_model.loading import load_model

    torch.set_num_threads(threads)
    model = load_model(None, preset, device="cpu", seed=seed).model
    points = [Shape(h, w, classes + 3 * i, masks + 2 * i) for i, (h, w) in enumerate(shapes)]
    lines: list[str] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_bundle(model, Path(tmp) / "bundle", None, {}, example=points[0], checks=tuple(points[1:]),
                                report=lines.append)
    total = time.perf_counter() - start
    pieces = {}
    for name, piece in manifest.pieces.items():
        parity = [{"shape": p.shape, "max_rel": p.max_rel, "max_abs": p.max_abs, "eager_sensitivity": p.eager_sensitivity}
                  for p in piece.parity]
        pieces[name] = {
            "op_count": piece.op_count,
            "file_mb": round(sum(f.bytes for f in piece.files()) / 1e6, 1),
            "export_s": _export_seconds(lines, name),
            "parity": parity,
            "worst_rel": max((v for p in piece.parity for v in p.max_rel.values()), default=0.0),
            "worst_eager_sensitivity": max((v for p in piece.parity for v in p.eager_sensitivity.values()), default=0.0),
        }
    return {
        "preset": preset,
        "weights": "random (seed %d)" % seed,
        "threads": threads,
        "total_s": round(total, 1),
        "sensitivity": {"noise": SENSITIVITY_NOISE, "gate_multiple": SENSITIVITY_MULTIPLE},
        "pieces": pieces,
        "pipeline_vs_eager": {variant: [vars(c) for c in checks] for variant, checks in manifest.pipeline_check.items()},
        "log": lines,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "cpu": platform.processor() or platform.machine(),
    }


def _export_seconds(lines: list[str], piece: str) -> float | None:
    """The export time from the piece's progress line (`<piece>: ... exported in N s ...`)."""
    for line in lines:
        found = re.match(rf"{piece}: .* exported in (\d+) s", line)
        if found:
            return float(found.group(1))
    return None


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

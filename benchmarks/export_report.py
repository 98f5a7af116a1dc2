"""Export every piece of a preset and report op count, file size, export time and parity.

Random weights by default (the numbers describe the graphs, not a trained model). The ONNX
files go to a temporary folder and are removed afterwards; only the report is kept.

For scale, each piece also reports its eager sensitivity: how far eager's own outputs move
when its float inputs are perturbed by 1e-7 relative noise (float rounding). A parity value
of that size is the model's conditioning (e.g. masked-attention blocks at `sigmoid == 0.5`
flipping), not a difference introduced by the export.

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
    from export.pieces import PIECES
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
                "eager_sensitivity_1e-7": eager_sensitivity(model, name, points[0]),
            }
            for name, r in records.items()
        }
        pipeline = pipeline_agreement(model, records, points[0]) if set(records) == set(PIECES) else None
    return {
        "preset": preset,
        "weights": "random (seed %d)" % seed,
        "threads": threads,
        "total_s": round(time.perf_counter() - start, 1),
        "pieces": pieces,
        "pipeline_vs_eager": pipeline,
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__},
        "cpu": platform.processor() or platform.machine(),
    }


def pipeline_agreement(model, records, shape) -> dict:
    """Label maps of the pipeline assembled from ONNX Runtime sessions against eager, on a drawn scene."""
    import torch

    from export import ort_pipeline
    from runtime.vocab import benchmark_vocabularies
    from scan_model.synthetic import synthetic_scene

    names = benchmark_vocabularies()["ade150"][: shape.classes]
    sessions = ort_pipeline.sessions({name: r.path for name, r in records.items()})
    image = torch.from_numpy(synthetic_scene(shape.height, shape.width, seed=3).copy()).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        eager = model(image, model.text_classifier(model.encode_text(names))).sem_seg
    classifier = ort_pipeline.onnx_classifier(model, sessions["text_encoder"], names)
    onnx_map = ort_pipeline.onnx_pipeline(model, sessions, image, classifier)
    return {
        "image": f"synthetic scene {shape.height}x{shape.width}, {len(names)} ade150 names",
        "label_agreement": float((eager.argmax(0) == onnx_map.argmax(0)).double().mean()),
        "sem_seg_max_rel": float((eager - onnx_map).abs().max() / eager.abs().max()),
    }


def eager_sensitivity(model, piece: str, shape, noise: float = 1e-7, seed: int = 5) -> dict[str, float]:
    """Max relative change of each eager output under `noise` relative perturbation of the float inputs."""
    import torch

    from export.pieces import PIECES, example_inputs

    wrapper = PIECES[piece](model).eval()
    args = example_inputs(model, piece, shape.height, shape.width, shape.classes, shape.masks, seed=1)
    gen = torch.Generator().manual_seed(seed)
    noisy = [a * (1 + noise * torch.randn(a.shape, generator=gen)) if a.is_floating_point() and a.dim() else a for a in args]
    with torch.no_grad():
        ref, out = wrapper(*args), wrapper(*noisy)
    ref, out = (ref, out) if isinstance(ref, tuple) else ((ref,), (out,))
    return {
        name: float((o.double() - r.double()).abs().max() / r.double().abs().max().clamp_min(1e-30))
        for name, o, r in zip(wrapper.output_names, out, ref) if r.is_floating_point()
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

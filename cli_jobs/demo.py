"""`scan demo`: the product's main job on the embedded default, with nothing downloaded.

1. export the `tiny` preset (seeded random weights) to a bundle with fp32 and INT8 pieces;
2. segment a drawn scene with the torch-free runtime (`runtime.Segmenter`);
3. `scan bench`: eager PyTorch against ONNX Runtime fp32 and INT8 on that scene, with the
   table printed and the JSON, markdown and plot written beside the outputs.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from runtime.files import atomic_write
from runtime.manifest import MANIFEST
from runtime.synthetic import synthetic_scene

from .common import check_output_dir, require_torch, say

DEMO_VOCABULARY = ["sky", "grass", "house", "roof", "window", "sun", "ball", "tree"]
DEMO_SIZE = (480, 640)  # height, width of the drawn scene


def run_demo(out: Path, preset: str = "tiny", seed: int = 0, bundle: Path | None = None, runs: int = 3) -> list[Path]:
    """Export (unless `bundle` is given), segment with the runtime, benchmark; the files written."""
    require_torch("scan demo")
    from .bench import BenchOptions, run_bench_job
    from .export import ExportOptions, run_export
    from .segment import SegmentOptions, run_segment

    check_output_dir(out / "input")
    vocab = ",".join(DEMO_VOCABULARY)
    image_path = out / "input" / "demo.png"
    image = synthetic_scene(*DEMO_SIZE, seed=seed)
    atomic_write(image_path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
    if bundle is None:
        bundle = out / "bundle"
        if (bundle / MANIFEST).is_file():
            say(f"demo 1/3: reusing the bundle in {bundle} (delete it to export again)")
        else:
            say(f"demo 1/3: exporting the {preset} preset (random weights, seed {seed}) with INT8 pieces to {bundle}")
            run_export(ExportOptions(out=bundle, preset=preset, seed=seed, precision="int8", vocab=vocab))
    say("demo 2/3: segmenting the drawn scene with the torch-free runtime (ONNX Runtime)")
    written = run_segment(SegmentOptions(images=[image_path], vocab=vocab, out=out, bundle=bundle, save_logits=True,
                                         resize=False))
    say("demo 3/3: scan bench, eager PyTorch against ONNX Runtime fp32 and INT8 on the same scene")
    reports = [out / "bench.json", out / "bench.md", out / "bench.png"]
    run_bench_job(BenchOptions(backends="eager,onnxruntime,onnxruntime-int8", bundle=bundle, image_size="x".join(map(str, DEMO_SIZE)),
                               vocab=vocab, runs=runs, warmup=1, seed=seed, json=reports[0], markdown=reports[1], plot=reports[2]))
    files = [image_path, *written, *reports]
    say(f"demo: wrote {', '.join(str(p) for p in files)}")
    return files

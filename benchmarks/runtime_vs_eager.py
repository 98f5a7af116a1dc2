"""The torch-free runtime (ONNX Runtime, CPU) against the eager model, side by side in one process.

Protocol: one model (random weights by default), exported once to a bundle (reused when the
folder already holds one); the same image and vocabulary for both; fixed thread counts for
PyTorch and ONNX Runtime; one warm-up call each, then `--runs` calls alternating eager and
runtime; medians per stage. Also the vocabulary cost of the runtime: `ade150` cold (an empty
text cache, every name through the text encoder) and warm (a new `Segmenter` on the same cache).

    python -m benchmarks.runtime_vs_eager --preset vitb --size 640x640 --bundle /tmp/vitb \
        --json benchmarks/results/runtime_vs_eager_vitb_640x640.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import parse_size, report

NAMES = "cup,saucer,spoon,coffee,table,wall,plate,person,cat,tree"


def _median_stages(results) -> dict[str, float]:
    keys = sorted({k for r in results for k in r.timings})
    return {k: statistics.median(r.timings.get(k, 0.0) for r in results) for k in keys}


def measure(preset: str, size: tuple[int, int], runs: int, threads: int, bundle: Path, seed: int = 0) -> dict:
    import numpy as np
    import onnxruntime
    import torch

    from export.bundle import write_bundle
    from runtime.manifest import MANIFEST
    from runtime.segmenter import Segmenter
    from runtime.synthetic import synthetic_scene
    from runtime.vocab import benchmark_vocabularies
    from scan_model.loading import load_model
    from scan_model.segmenter import EagerSegmenter

    torch.set_num_threads(threads)
    model = load_model(None, preset, device="cpu", seed=seed).model
    export_s = None
    if not (bundle / MANIFEST).is_file():
        start = time.perf_counter()
        write_bundle(model, bundle, None, {}, report=print)
        export_s = time.perf_counter() - start
    names = NAMES.split(",")
    image = synthetic_scene(*size, seed=seed)
    eager = EagerSegmenter(model, resize=False)
    eager.set_vocabulary(names)
    with tempfile.TemporaryDirectory() as cache:
        runtime = Segmenter(bundle, resize=False, threads=threads, cache_dir=cache)
        runtime.set_vocabulary(names)
        eager.segment(image)
        runtime.segment(image)
        timed = {"eager": [], "runtime": []}
        totals = {"eager": [], "runtime": []}
        for _ in range(runs):
            for name, segmenter in (("eager", eager), ("runtime", runtime)):
                start = time.perf_counter()
                timed[name].append(segmenter.segment(image))
                totals[name].append(time.perf_counter() - start)
        agreement = float(np.mean([(a.label_map == b.label_map).mean() for a, b in zip(timed["eager"], timed["runtime"])]))

        ade150 = benchmark_vocabularies()["ade150"]
        start = time.perf_counter()
        runtime.set_vocabulary(ade150)
        cold_s, cold_calls = time.perf_counter() - start, runtime.text_encoder_calls
        warm = Segmenter(bundle, resize=False, threads=threads, cache_dir=cache, verify="size")
        start = time.perf_counter()
        warm.set_vocabulary(ade150)
        warm_s = time.perf_counter() - start
        start = time.perf_counter()
        eager.set_vocabulary(ade150)
        eager_text_s = time.perf_counter() - start

    median = {k: statistics.median(v) for k, v in totals.items()}
    return {
        "preset": preset,
        "weights": f"random (seed {seed})",
        "input_hw": list(size),
        "threads": threads,
        "vocabulary_size": len(names),
        "valid_regions": timed["runtime"][0].num_regions,
        "runs": runs,
        "median_s": median,
        "eager_over_runtime": median["eager"] / median["runtime"],
        "stages_median_s": {k: _median_stages(v) for k, v in timed.items()},
        "label_agreement": agreement,
        "text_ade150": {"cold_s": cold_s, "cold_encoder_calls": cold_calls, "warm_s": warm_s,
                        "warm_encoder_calls": warm.text_encoder_calls, "cold_over_warm": cold_s / warm_s,
                        "eager_encode_s": eager_text_s},
        "export_s": export_s,
        "versions": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "python": platform.python_version()},
        "cpu": platform.processor() or platform.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", default="640x640", help="HxW of the generated test image")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bundle", type=Path, required=True, help="bundle folder (exported there when absent)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    report(measure(args.preset, parse_size(args.size), args.runs, args.threads, args.bundle), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Wall time of the eager PyTorch model on one image, per stage.

Protocol (the same as the official fixture's `timing.json`, so the numbers sit side by
side): fixed thread count, one warm-up call (which also encodes the vocabulary), then the
median of N timed calls. Random weights by default; pass --checkpoint/--config for real ones.

    python -m benchmarks.eager --preset tiny --size 320x480 --runs 3 --json benchmarks/results/eager_tiny.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

from benchmarks.common import parse_size, report


def measure(preset: str, size: tuple[int, int], runs: int, threads: int, vocab: list[str], checkpoint=None, seed: int = 0) -> dict:
    import torch

    from scan_model.loading import load_model
    from scan_model.segmenter import EagerSegmenter
    from runtime.synthetic import synthetic_scene

    torch.set_num_threads(threads)
    loaded = load_model(checkpoint, preset, device="cpu", seed=seed)
    segmenter = EagerSegmenter(loaded.model, resize=False)
    image = synthetic_scene(*size, seed=seed)
    start = time.perf_counter()
    segmenter.set_vocabulary(vocab)
    warm = segmenter.segment(image)
    warmup_s = time.perf_counter() - start
    totals, stages = [], []
    for _ in range(runs):
        start = time.perf_counter()
        result = segmenter.segment(image)
        totals.append(time.perf_counter() - start)
        stages.append(result.timings)
    median = statistics.median(totals)
    pick = stages[totals.index(median)]
    return {
        "preset": preset,
        "input_hw": list(size),
        "threads": threads,
        "vocabulary_size": len(vocab),
        "valid_regions": warm.num_regions,
        "warmup_s": warmup_s,
        "runs_s": totals,
        "median_s": median,
        "stages_s": pick,
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--size", default="320x480", help="HxW of the generated test image")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--vocab", default="cup,saucer,spoon,coffee,table,wall,plate,person,cat,tree")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    height, width = parse_size(args.size)
    result = measure(args.preset, (height, width), args.runs, args.threads, args.vocab.split(","), args.checkpoint)
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

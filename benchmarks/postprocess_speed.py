"""Post-processing, the runtime's numpy against eager PyTorch doing the same operations, alternating,
in one process.

Both sides start from the same mask logits (Q, h/4, w/4) and class scores (Q, K) and end with the
label map and each pixel's label score: upsample the logits to the padded size (bilinear), crop,
sigmoid; the semantic map (K x Q @ Q x HW); its bilinear resize to the original image size where
that differs; the first-max argmax over classes. The runtime runs `runtime.postprocess`
(`mask_probabilities`, `labels_from_scores`) on `--threads` threads; eager runs
`scan_model.ensemble.upsample_masks(...).sigmoid()`, `semantic_map` and
`scan_model.segmenter._postprocess` with `torch.set_num_threads(--threads)`. numpy's BLAS keeps its
own default thread count (as in a real runtime process); the result records it where it was set.

Cases (Q = 100 queries, K = 150 classes, square images, padded size = processed size):
  640        a 640x640 image, processed at 640: masks (100, 160, 160) -> (100, 640, 640), no final resize
  2560       a 2560x2560 image through the official test resize (processed at 640): the
             (150, 640, 640) semantic map is resized to 2560x2560
  2560_full  the same image without the test resize: masks (100, 640, 640) -> (100, 2560, 2560),
             the semantic map made at 2560 directly

Inputs are synthetic: logits N(0, 4^2) (standard deviation 4, the scale of trained mask logits),
scores uniform in [0, 1). Each side first makes one untimed call per case (first-touch page faults
of the large arrays, lazy initialisation); then `--runs` rounds, each timing both sides, the first
side alternating. Medians over the rounds. The runtime's working memory is its peak traced
allocation (`tracemalloc`, which numpy reports to) in one extra call, less its outputs (the
(Q, H, W) probabilities of `mask_probabilities`, the labels of `labels_from_scores`).

    python -m benchmarks.postprocess_speed --out benchmarks/results/postprocess_speed.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import tracemalloc
from dataclasses import dataclass
from pathlib import Path

QUERIES, CLASSES = 100, 150
LOGIT_STD = 4.0
BUDGET_BYTES = 256 << 20  # the runtime's working-memory bound (labels_from_scores' default)
BLAS_THREAD_VARIABLES = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Case:
    image: int  # the original (square) image side, the output size
    processed: int  # the side the model sees (after the test resize, if any): the padded size

    @property
    def mask_side(self) -> int:
        return self.processed // 4


CASES = {
    "640": Case(image=640, processed=640),
    "2560": Case(image=2560, processed=640),
    "2560_full": Case(image=2560, processed=2560),
}


def _inputs(case: Case, seed: int):
    import numpy as np

    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((QUERIES, case.mask_side, case.mask_side)) * LOGIT_STD).astype(np.float32)
    return logits, rng.random((QUERIES, CLASSES), dtype=np.float32)


def _runtime(case: Case, logits, scores, threads: int):
    """(seconds per stage, labels, label scores) of the runtime's post-processing."""
    import numpy as np

    from runtime.postprocess import labels_from_scores, mask_probabilities

    padded, size = (case.processed,) * 2, (case.image,) * 2
    start = time.perf_counter()
    probs = mask_probabilities(logits, padded, padded, threads=threads)
    masks = time.perf_counter()
    best = np.empty(size, dtype=np.float32)
    labels, _ = labels_from_scores(scores, probs, size, label_scores=best, threads=threads)
    end = time.perf_counter()
    return {"masks": masks - start, "labels": end - masks, "total": end - start}, labels, best


def _eager(case: Case, logits, scores):
    """The same for eager PyTorch (inputs already tensors)."""
    import torch

    from scan_model.ensemble import semantic_map, upsample_masks
    from scan_model.segmenter import _postprocess

    padded, size = (case.processed,) * 2, (case.image,) * 2
    with torch.no_grad():
        start = time.perf_counter()
        probs = upsample_masks(logits[None], padded, padded)[0].sigmoid()
        masks = time.perf_counter()
        labels, _, best = _postprocess(semantic_map(scores, probs), size, False)
        end = time.perf_counter()
    return {"masks": masks - start, "labels": end - masks, "total": end - start}, labels, best


def _working_bytes(case: Case, logits, scores, threads: int) -> dict[str, int]:
    """Peak traced allocation of each runtime call beyond its outputs."""
    import numpy as np

    from runtime.postprocess import labels_from_scores, mask_probabilities

    padded, size = (case.processed,) * 2, (case.image,) * 2
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        probs = mask_probabilities(logits, padded, padded, threads=threads)
        masks = tracemalloc.get_traced_memory()[1] - base - probs.nbytes
        best = np.empty(size, dtype=np.float32)
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        labels, _ = labels_from_scores(scores, probs, size, label_scores=best, threads=threads)
        labels_peak = tracemalloc.get_traced_memory()[1] - base - labels.nbytes
    finally:
        tracemalloc.stop()
    return {"mask_probabilities": int(masks), "labels_from_scores": int(labels_peak)}


def _stage_medians(runs: list[dict]) -> dict:
    return {stage: {"median_s": round(statistics.median(r[stage] for r in runs), 4),
                    "seconds": [round(r[stage], 4) for r in runs]} for stage in runs[0]}


def run_case(name: str, case: Case, runs: int, threads: int, seed: int) -> dict:
    import numpy as np
    import torch

    logits, scores = _inputs(case, seed)
    logits_t, scores_t = torch.from_numpy(logits), torch.from_numpy(scores)
    _runtime(case, logits, scores, threads)  # warm-up: page faults, lazy initialisation
    _eager(case, logits_t, scores_t)
    timings: dict[str, list[dict]] = {"runtime": [], "eager": []}
    for round_ in range(runs):
        order = ("runtime", "eager") if round_ % 2 == 0 else ("eager", "runtime")
        for side in order:
            if side == "runtime":
                seconds, labels, best = _runtime(case, logits, scores, threads)
            else:
                seconds, eager_labels, eager_best = _eager(case, logits_t, scores_t)
            timings[side].append(seconds)
    result = {
        "image": [case.image, case.image], "processed": [case.processed, case.processed],
        "mask_logits": [QUERIES, case.mask_side, case.mask_side],
        "probabilities": [QUERIES, case.processed, case.processed], "classes": CLASSES,
        "semantic_map_resized": case.processed != case.image,
        "runtime": _stage_medians(timings["runtime"]), "eager": _stage_medians(timings["eager"]),
    }
    result["eager_over_runtime"] = {stage: round(result["eager"][stage]["median_s"] / result["runtime"][stage]["median_s"], 2)
                                    for stage in ("masks", "labels", "total")}
    result["label_agreement"] = float(np.mean(labels == eager_labels))
    result["max_label_score_difference"] = float(np.abs(best.astype(np.float64) - eager_best).max())
    result["runtime_working_bytes"] = _working_bytes(case, logits, scores, threads)
    result["working_memory_within_budget"] = max(result["runtime_working_bytes"].values()) <= BUDGET_BYTES
    print(f"{name}: runtime {result['runtime']['total']['median_s']:.3f} s, eager {result['eager']['total']['median_s']:.3f} s",
          flush=True)
    return result


def _write_json(result: dict, path: Path) -> None:
    from runtime.files import atomic_write

    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    from benchmarks.machine import machine, torch_threads, versions

    with torch_threads(args.threads):
        cases = {name: run_case(name, CASES[name], args.runs, args.threads, args.seed) for name in args.cases}
    result = {
        "what": "post-processing: mask upsampling + sigmoid ('masks'), semantic map + resize + argmax ('labels'); "
                "runtime.postprocess against eager PyTorch, the same operations",
        "method": f"one process; per case 1 untimed call per side, then {args.runs} rounds timing both sides, "
                  "the first side alternating; medians. Synthetic inputs: logits N(0, 4^2), scores U[0, 1). "
                  "Working memory: tracemalloc peak of each runtime call less its outputs.",
        "threads": {"runtime": args.threads, "torch_intra_op": args.threads,
                    "blas_environment": {v: os.environ.get(v) for v in BLAS_THREAD_VARIABLES}},
        "runs": args.runs, "seed": args.seed, "queries": QUERIES, "classes": CLASSES, "budget_bytes": BUDGET_BYTES,
        "cases": cases, "machine": machine(), "versions": versions(),
    }
    print(json.dumps(result, indent=1))
    if args.out:
        _write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()

"""A cold vocabulary through a bundle's text encoder: 77-token rows against rows cut to the longest
prompt of each length-sorted batch, through the same graph, alternating, in one process.

Each run encodes every name of the vocabulary with the 14 templates on an empty cache (a new
`TextEmbedder` per run), once with `cut_to_longest` off (what bundles did before the cut) and
once on; the classifier rows of the two are compared (max abs difference; rows are unit vectors).

    python -m benchmarks.text_cut --bundle ~/.cache/scan-deploy/bundles/vitb-... --vocab ade150 \
        --backend onnxruntime --runs 2 --json benchmarks/results/text_cut_vitb_ade150.json
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import report
from benchmarks.machine import machine, versions


def _embedder(segmenter, cache: Path, cut: bool):
    from runtime.text import TextEmbedder
    from runtime.tokenizer import ClipTokenizer

    spec = segmenter.manifest.tokenizer
    tokenizer = ClipTokenizer.from_file(segmenter.root / spec.bpe.file, spec.context_length, spec.sot, spec.eot)
    runner = segmenter.runners["text_encoder"]
    embedder = TextEmbedder(segmenter.root, segmenter.manifest, tokenizer,
                            lambda tokens: runner.run({"tokens": tokens})["text_features"], cache_dir=cache)
    embedder._bundle_caches = []  # cold: no name from the bundle's own caches either
    embedder.cut_to_longest = cut
    return embedder


def main(argv=None) -> dict:
    from runtime.segmenter import Segmenter
    from runtime.vocab import parse_vocabulary

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--vocab", default="ade150")
    parser.add_argument("--backend", default="onnxruntime")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    names = parse_vocabulary(args.vocab)
    with tempfile.TemporaryDirectory(prefix="scan-text-cut-") as folder:
        segmenter = Segmenter(args.bundle, backend=args.backend, precision=args.precision, threads=args.threads,
                              cache_dir=Path(folder) / "segmenter", verify="size")
        seconds: dict[str, list[float]] = {"77_tokens": [], "cut": []}
        rows: dict[str, np.ndarray] = {}
        for run in range(args.runs):
            for label, cut in (("77_tokens", False), ("cut", True)):
                embedder = _embedder(segmenter, Path(folder) / f"{label}-{run}", cut)
                start = time.perf_counter()
                rows[label] = embedder.embeddings(names)
                seconds[label].append(time.perf_counter() - start)
    full, cut = statistics.median(seconds["77_tokens"]), statistics.median(seconds["cut"])
    result = {
        "what": "cold vocabulary (every name x 14 templates through the text encoder), 77-token rows vs cut rows",
        "bundle": str(args.bundle), "model": segmenter.manifest.model.name, "vocabulary": args.vocab,
        "names": len(names), "prompts": len(names) * len(segmenter.manifest.templates["vild"]),
        "backend": f"{segmenter.backend}-{segmenter.precision}", "threads": args.threads, "runs": args.runs,
        "seconds": seconds, "median_77_tokens_s": round(full, 3), "median_cut_s": round(cut, 3),
        "speedup": round(full / cut, 2),
        "max_abs_row_difference": float(np.abs(rows["cut"].astype(np.float64) - rows["77_tokens"]).max()),
        "machine": machine(), "versions": versions(),
    }
    report(result, args.json)
    return result


if __name__ == "__main__":
    main()

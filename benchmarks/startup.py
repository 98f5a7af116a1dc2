"""Start-up and one large image per backend, each in processes of its own.

For each backend, two fresh processes open the bundle one after the other, on one cache folder
that starts empty:

- The first open compiles (OpenVINO) or loads (ONNX Runtime) every piece, and fills the
  compiled-model cache.
- The second open is a real second start: a new process, reading the cache.

The second process then sets the vocabulary (its text from the bundle's text encoder) and
segments one generated scene of `--image-size`, fed without the official resize, as
`scan bench` feeds its scenes. It reports the seconds of that call and the process's peak
resident memory (`getrusage`). Because every backend has its own processes, each peak is that
backend's alone.

The eager backend has no compiled cache: its first and second opens are model builds.

    python -m benchmarks.startup --bundle ~/.cache/scan-deploy/bundles/vitb-... \\
        --backends eager,onnxruntime,onnxruntime-int8,openvino,openvino-int8 --image-size 2560 \\
        --out benchmarks/results/startup_vitb_2560x2560.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import parse_size, report
from benchmarks.machine import machine, versions


def _open(bundle: Path, backend: str, threads: int, cache: Path, seed: int):
    """(the backend's segmenter, what actually runs) for 'eager' or 'kind[-precision]'."""
    if backend == "eager":
        from runtime.manifest import read_manifest
        from scan_model.loading import load_model
        from scan_model.segmenter import EagerSegmenter

        import torch

        torch.set_num_threads(threads)
        spec = cache / "config.json"
        spec.write_text(json.dumps(read_manifest(bundle).model.config))
        return EagerSegmenter(load_model(None, spec, seed=seed).model, resize=False, seed=seed), "eager-fp32"
    from runtime.segmenter import Segmenter

    kind, _, precision = backend.partition("-")
    segmenter = Segmenter(bundle, backend=kind, precision=precision or None, threads=threads, resize=False,
                          cache_dir=cache, report=lambda line: None)
    return segmenter, f"{segmenter.backend}-{segmenter.precision}"


def child(args) -> dict:
    """One process: open, and with --segment also set the vocabulary and segment one scene."""
    start = time.perf_counter()
    segmenter, runs = _open(args.bundle, args.backend, args.threads, args.cache, args.seed)
    result = {"open_s": round(time.perf_counter() - start, 3), "runs": runs}
    if args.segment:
        from runtime.synthetic import synthetic_scene
        from runtime.vocab import parse_vocabulary

        start = time.perf_counter()
        segmenter.set_vocabulary(parse_vocabulary(args.vocab))
        result["vocabulary_s"] = round(time.perf_counter() - start, 3)
        height, width = args.image_size
        scene = synthetic_scene(height, width, seed=args.seed)
        start = time.perf_counter()
        segmented = segmenter.segment(scene)
        result["segment_s"] = round(time.perf_counter() - start, 3)
        result["stages_s"] = {k: round(v, 3) for k, v in segmented.timings.items()}
        result["valid_regions"] = segmented.num_regions
    result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return result


def _run_child(args, backend: str, cache: Path, segment: bool) -> dict:
    command = [sys.executable, "-m", "benchmarks.startup", "--child", "--bundle", str(args.bundle), "--backends",
               backend, "--threads", str(args.threads), "--cache", str(cache), "--seed", str(args.seed),
               "--vocab", args.vocab, "--image-size", "x".join(map(str, args.image_size))]
    done = subprocess.run(command + (["--segment"] if segment else []), capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return {"failed": f"exit status {done.returncode}: {tail[0]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--backends", default="onnxruntime,openvino")
    parser.add_argument("--image-size", type=lambda t: parse_size(t, "--image-size"), default=(2560, 2560))
    parser.add_argument("--vocab", default="ade150")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--segment", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.backend = args.backends
        print(json.dumps(child(args)))
        return {}
    backends: dict[str, dict] = {}
    for backend in [b.strip() for b in args.backends.split(",") if b.strip()]:
        with tempfile.TemporaryDirectory(prefix="scan-startup-") as folder:
            first = _run_child(args, backend, Path(folder), segment=False)
            second = _run_child(args, backend, Path(folder), segment=True)
        backends[backend] = {"first_open": first, "second_open_and_segment": second}
        print(f"{backend}: first open {first.get('open_s')} s, second {second.get('open_s')} s, "
              f"{args.image_size} in {second.get('segment_s')} s", file=sys.stderr, flush=True)
    result = {
        "what": "per backend, in fresh processes on one empty cache folder: first open, second open, then one "
                "generated scene without the official resize; peak RSS of that second process",
        "bundle": str(args.bundle), "image_size": list(args.image_size), "vocabulary": args.vocab,
        "threads": args.threads, "seed": args.seed, "backends": backends,
        "machine": machine(), "versions": versions(),
    }
    report(result, args.out)
    return result


if __name__ == "__main__":
    main()

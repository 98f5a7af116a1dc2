"""int8 against fp32 pieces of an exported bundle: ONNX Runtime CPU time per call and parity.

Quantises the chosen pieces with `export.int8.quantize_piece` (unless the int8 file is
already there) and runs fp32 and int8 sessions on the same realistic inputs: a drawn scene at
640x640, the fp32 image encoder's own shift tokens, region masks drawn as blobs (N per call, as
the runtime chunks), a normalised random text classifier; the mask decoder gets the fp32 image
encoder's outputs, the text encoder one prompt per ADE-150 name. Runs alternate fp32 and int8;
medians. Parity: max |int8 - fp32| / max |fp32| per output.

    python -m benchmarks.int8_speed --bundle /tmp/bench/vitb --out /tmp/int8_vitb \
        --json benchmarks/results/int8_vitb_640x640.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import parse_size, report


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def blobs(count: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """(count, h, w) float32 probabilities: one soft elliptic blob per mask, peak near 1."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[0:height, 0:width].astype(np.float32)
    masks = np.empty((count, height, width), dtype=np.float32)
    for i in range(count):
        cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
        sy, sx = rng.uniform(0.05, 0.3) * height, rng.uniform(0.05, 0.3) * width
        masks[i] = np.exp(-0.5 * (((rows - cy) / sy) ** 2 + ((cols - cx) / sx) ** 2))
    return masks


def inputs(manifest, bundle: Path, size: tuple[int, int], masks: int, classes: int, threads: int) -> dict[str, dict]:
    from runtime.preprocess import nearest_square, normalise_and_pad
    from runtime.settings import shift_counts, shift_key
    from runtime.synthetic import synthetic_scene
    from runtime.tokenizer import ClipTokenizer
    from runtime.vocab import benchmark_vocabularies

    pre, inf = manifest.preprocess, manifest.inference
    scene = synthetic_scene(*size, seed=3)
    swin = normalise_and_pad(scene, pre.pixel_mean, pre.pixel_std, pre.size_divisibility)
    clip = nearest_square(normalise_and_pad(scene, pre.clip_mean, pre.clip_std, pre.size_divisibility), pre.clip_image_size)
    encoder = {"image": swin, "clip_image": clip}
    session = _session(bundle / manifest.pieces["image_encoder"].file, threads)
    encoded = dict(zip([o.name for o in session.get_outputs()], session.run(None, encoder)))
    shift_tokens = encoded["shift_tokens"][0]
    rng = np.random.default_rng(1)
    classifier = rng.standard_normal((classes + 1, len(manifest.non_object_embedding))).astype(np.float32)
    classifier /= np.linalg.norm(classifier, axis=1, keepdims=True)
    decoder = {k: v for k, v in encoded.items() if k != "shift_tokens"} | {"text_classifier": classifier}
    tokenizer = ClipTokenizer.from_file(bundle / manifest.tokenizer.bpe.file, manifest.tokenizer.context_length,
                                        manifest.tokenizer.sot, manifest.tokenizer.eot)
    names = benchmark_vocabularies()["ade150"][:classes]
    text = {"tokens": tokenizer([f"a photo of a {name}." for name in names])}
    layers, patches = len(inf.replace_layers), inf.shift_patches
    adapter = {
        "image": np.ascontiguousarray(scene.transpose(2, 0, 1), dtype=np.float32),
        "mask_probs": blobs(masks, *size),
        "mask_threshold": np.asarray(0.4, dtype=np.float32),
        "shift_tokens": shift_tokens,
        "text_classifier": classifier,
        "shift_counts": np.asarray(shift_counts(patches, 0.5), dtype=np.int64),
        "shift_keys": np.ascontiguousarray(np.broadcast_to(shift_key(patches, 0), (layers, masks, patches))),
    }
    return {"image_encoder": encoder, "clip_adapter": adapter, "mask_decoder": decoder, "text_encoder": text}


def measure_piece(fp32: Path, int8: Path, feeds: dict, runs: int, threads: int) -> dict:
    sessions = {"fp32": _session(fp32, threads), "int8": _session(int8, threads)}
    outputs = {name: dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds))) for name, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):  # alternating, so both see the same machine load
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    parity = {}
    for name, ref in outputs["fp32"].items():
        if ref.dtype == np.bool_:
            parity[name] = float((outputs["int8"][name] != ref).mean())
        else:
            diff = np.abs(outputs["int8"][name].astype(np.float64) - ref)
            parity[name] = float(diff.max() / max(float(np.abs(ref).max()), 1e-30))
    result = {"runs_s": times, "median_s": medians, "speedup": medians["fp32"] / medians["int8"], "max_rel": parity,
              "bytes": {"fp32": fp32.stat().st_size, "int8": int8.stat().st_size}}
    if "region_logits" in outputs["fp32"]:
        ref, ours = outputs["fp32"]["region_logits"], outputs["int8"]["region_logits"]
        result["region_argmax_agreement"] = float((ref.argmax(1) == ours.argmax(1)).mean())
    return result


def main(argv: list[str] | None = None) -> int:
    from export.int8 import quantize_piece
    from runtime.manifest import read_manifest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="Folder for the int8 files.")
    parser.add_argument("--pieces", default="clip_adapter,image_encoder")
    parser.add_argument("--size", default="640x640")
    parser.add_argument("--masks", type=int, default=8)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--per-channel", type=int, default=1)
    parser.add_argument("--reduce-range", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    manifest = read_manifest(args.bundle)
    args.out.mkdir(parents=True, exist_ok=True)
    feeds = inputs(manifest, args.bundle, parse_size(args.size), args.masks, args.classes, args.threads)
    tag = f"pc{args.per_channel}-rr{args.reduce_range}"
    result = {"bundle": str(args.bundle), "model": manifest.model.name, "size": args.size, "masks": args.masks,
              "classes": args.classes, "threads": args.threads, "per_channel": bool(args.per_channel),
              "reduce_range": bool(args.reduce_range), "load_average_at_start": os.getloadavg()[0], "pieces": {}}
    for piece in args.pieces.split(","):
        fp32 = args.bundle / manifest.pieces[piece].file
        int8 = args.out / f"{piece}.{tag}.int8.onnx"
        seconds = None
        if not int8.is_file():
            start = time.perf_counter()
            quantize_piece(fp32, int8, per_channel=bool(args.per_channel), reduce_range=bool(args.reduce_range))
            seconds = time.perf_counter() - start
        result["pieces"][piece] = {"quantize_s": seconds, **measure_piece(fp32, int8, feeds[piece], args.runs, args.threads)}
    result["load_average_at_end"] = os.getloadavg()[0]  # this run's own threads included
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

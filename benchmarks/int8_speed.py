"""int8 forms of a bundle's pieces on ONNX Runtime: the calibrated QDQ files against dynamic
quantisation, both against fp32, in time per call and parity.

The bundle must have int8 pieces (`scan export --precision int8`, NNCF QDQ files); the dynamic
form (`onnxruntime.quantization.quantize_dynamic`: int8 weights per channel, activations
quantised at run time, what ONNX Runtime's own int8 path was before calibration) is written to
`--out` unless already there. All run on the same realistic inputs: a drawn scene at
640x640, the fp32 image encoder's own shift tokens, region masks drawn as blobs (N per call, as
the runtime chunks), a normalised random text classifier; the mask decoder gets the fp32 image
encoder's outputs, the text encoder one prompt per ADE-150 name. Runs alternate between the
forms; medians. Parity: max |int8 - fp32| / max |fp32| per output. This measurement decided what
`onnxruntime-int8` runs: the dynamic form where it is faster (export.int8.DYNAMIC_PIECES), the QDQ
file elsewhere (docs/performance.md). A bundle's own dynamic file is not reused here: the dynamic
form is written afresh to `--out`, so that old and new bundles are measured alike.

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


def measure_piece(files: dict[str, Path], feeds: dict, runs: int, threads: int) -> dict:
    """Alternating runs of each form in `files` ("fp32" first); medians and parity against fp32."""
    sessions = {name: _session(path, threads) for name, path in files.items()}
    outputs = {name: dict(zip([o.name for o in s.get_outputs()], s.run(None, feeds))) for name, s in sessions.items()}
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):  # alternating, so every form sees the same machine load
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    medians = {k: statistics.median(v) for k, v in times.items()}
    result = {"runs_s": times, "median_s": medians, "bytes": {k: p.stat().st_size for k, p in files.items()}}
    for form in [f for f in files if f != "fp32"]:
        parity = {}
        for name, ref in outputs["fp32"].items():
            if ref.dtype == np.bool_:
                parity[name] = float((outputs[form][name] != ref).mean())
            else:
                diff = np.abs(outputs[form][name].astype(np.float64) - ref)
                parity[name] = float(diff.max() / max(float(np.abs(ref).max()), 1e-30))
        result[form] = {"speedup": medians["fp32"] / medians[form], "max_rel": parity}
        if "region_logits" in outputs["fp32"]:
            ref, ours = outputs["fp32"]["region_logits"], outputs[form]["region_logits"]
            result[form]["region_argmax_agreement"] = float((ref.argmax(1) == ours.argmax(1)).mean())
    return result


def quantize_dynamic(fp32: Path, out: Path) -> None:
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as dynamic

    dynamic(fp32, out, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True, weight_type=QuantType.QInt8)


def main(argv: list[str] | None = None) -> int:
    from runtime.manifest import read_manifest

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True, help="Folder for the dynamically quantised files.")
    parser.add_argument("--pieces", default="clip_adapter,image_encoder")
    parser.add_argument("--size", default="640x640")
    parser.add_argument("--masks", type=int, default=8)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    from benchmarks.machine import machine

    manifest = read_manifest(args.bundle)
    args.out.mkdir(parents=True, exist_ok=True)
    feeds = inputs(manifest, args.bundle, parse_size(args.size), args.masks, args.classes, args.threads)
    result = {"bundle": str(args.bundle), "model": manifest.model.name, "size": args.size, "masks": args.masks,
              "classes": args.classes, "threads": args.threads, "machine": machine(),
              "load_average_at_start": os.getloadavg()[0], "pieces": {}}
    for piece in args.pieces.split(","):
        record = manifest.pieces[piece]
        if record.int8 is None:
            sys.exit(f"{args.bundle} has no int8 {piece}: export it with `scan export --precision int8`")
        dynamic = args.out / f"{piece}.dynamic.int8.onnx"
        if not dynamic.is_file():
            quantize_dynamic(args.bundle / record.file, dynamic)
        files = {"fp32": args.bundle / record.file, "qdq": args.bundle / record.int8.file, "dynamic": dynamic}
        result["pieces"][piece] = measure_piece(files, feeds[piece], args.runs, args.threads)
    result["load_average_at_end"] = os.getloadavg()[0]  # this run's own threads included
    report(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The bundle: ONNX pieces, tokenizer data, text caches and `manifest.json`, written atomically.

The bundle is built in a temporary sibling folder and renamed into place only when every
piece has passed its checks, so an interrupted or failed export leaves any previous bundle
at that path intact and no half-written folder behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from scan_model.model import ScanModel
from scan_model.text import VILD_TEMPLATES, encode_class_names

from .onnx_export import DENIED_OPS, EXTERNAL_DATA_BYTES, FP16_TOLERANCE, OPSET, ExportError, PieceExport, Shape, export_all
from .pieces import PIECES
from .tensorrt import ShapeRanges

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(ValueError):
    """A bundle that cannot be written where asked; the message says why."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_precision(precision: str) -> None:
    if precision not in ("fp32", "fp16"):
        raise BundleError(f"--precision {precision!r}: choose fp32 or fp16")


def check_destination(out: Path) -> None:
    """Refuse paths inside an existing bundle, non-bundle folders with content, unwritable parents."""
    out = out.resolve()
    for parent in out.parents:
        if (parent / MANIFEST).is_file():
            raise BundleError(f"{out} is inside the existing bundle {parent}: choose a path outside it")
    if out.exists():
        if not out.is_dir():
            raise BundleError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise BundleError(f"{out} is a non-empty folder that is not a bundle: choose an empty or new path")
    parent = out.parent
    if parent.exists() and not parent.is_dir():
        raise BundleError(f"cannot write {out}: {parent} is a file, not a folder")
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise BundleError(f"cannot create {parent}: {exc.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BundleError(f"cannot write into {parent}: permission denied")


def _io_contract(proto_path: Path) -> dict:
    import onnx

    proto = onnx.load(str(proto_path), load_external_data=False)
    names = {1: "float32", 7: "int64", 9: "bool", 10: "float16"}

    def describe(values):
        return [
            {
                "name": v.name,
                "dtype": names.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    return {"inputs": describe(proto.graph.input), "outputs": describe(proto.graph.output)}


def write_bundle(
    model: ScanModel,
    out: Path,
    checkpoint_hash: str | None,
    vocabularies: dict[str, list[str]],
    example: Shape = Shape(320, 480, 10, 8),
    checks: tuple[Shape, ...] = (Shape(256, 384, 5, 4), Shape(384, 256, 17, 12)),
    tolerance: float = 1e-3,
    pieces: tuple[str, ...] = tuple(PIECES),
    precision: str = "fp32",
    tensorrt: bool = False,
    ranges: ShapeRanges | None = None,
    trt_backend: str | None = None,
    external_data_bytes: int = EXTERNAL_DATA_BYTES,
    report=print,
) -> dict:
    """Export `pieces`, gate them, add tokenizer data and text caches; return the manifest.

    `precision="fp16"` adds an fp16 variant of every piece (for TensorRT; ONNX Runtime on
    CPU uses the fp32 files); `tensorrt` builds engines from the pieces of that precision.
    """
    check_precision(precision)
    out = Path(out)
    check_destination(out)
    parent = out.resolve().parent
    for stale in parent.glob(f".{out.name}.*.tmp"):  # left by an export that was killed outright
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=parent))
    except OSError as exc:
        raise BundleError(f"cannot create the bundle in {parent} ({exc.strerror}): choose a writable folder") from None
    try:
        records = export_all(model, tmp, example, list(checks), tolerance, pieces, fp16=precision == "fp16",
                             external_data_bytes=external_data_bytes, report=report)
        manifest = _manifest(model, records, checkpoint_hash, tolerance)
        manifest["pipeline_check"] = _pipeline_check(model, records, [example, *checks], precision, report)
        manifest["text_caches"] = _text_caches(model, tmp, vocabularies, manifest)
        manifest["engines"] = {}
        if tensorrt:
            from .engines import build_bundle_engines

            sources = {n: (r.fp16 if precision == "fp16" else r).path for n, r in records.items()}
            manifest["engines"] = build_bundle_engines(tmp, sources, ranges or ShapeRanges(), precision, trt_backend, report)
            for folder in manifest["engines"].values():
                for entry in folder["pieces"].values():
                    entry["sha256"] = sha256_file(tmp / entry["file"])
        _copy_tokenizer(tmp)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        _make_shareable(tmp)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _pipeline_check(model: ScanModel, records: dict, shapes: list[Shape], precision: str, report) -> dict:
    """End-to-end gate: the assembled ONNX Runtime pipeline gives eager's labels (needs all pieces)."""
    if set(records) != set(PIECES):
        return {}
    from runtime.vocab import benchmark_vocabularies

    from .ort_pipeline import pipeline_check

    vocabulary = benchmark_vocabularies()["ade150"][:10]
    results = pipeline_check(model, records, shapes, ("fp32", "fp16") if precision == "fp16" else ("fp32",), vocabulary)
    for variant in results:
        worst = min(r["label_agreement"] for r in results[variant])
        report(f"pipeline ({variant}): labels identical to eager on {worst:.4%} of pixels or more over {len(shapes)} scenes")
        failed = [r for r in results[variant] if not r["label_agreement"] >= r["required"]]
        if failed:
            raise ExportError(f"the assembled {variant} pipeline differs from eager: " + "; ".join(
                f"{r['image']}: {r['label_agreement']:.4%} identical labels, need {r['required']:.1%}" for r in failed))
    return results


def _make_shareable(folder: Path) -> None:
    """mkdtemp creates 0700 folders; give the bundle the permissions a normal mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)


def _replace(tmp: Path, out: Path) -> None:
    """Swap the finished folder into place; the old bundle is removed only after the rename."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _piece_entry(record: PieceExport, tolerance: float) -> dict:
    entry = {
        "file": record.path.name,
        "sha256": sha256_file(record.path),
        "precision": record.precision,
        "opset": OPSET,
        "op_count": record.op_count,
        **_io_contract(record.path),
        "parity": [asdict(p) for p in record.parity],
        "parity_tolerance": tolerance,
    }
    if record.external_data:
        data = record.files()[1]
        entry["external_data"] = {"file": data.name, "sha256": sha256_file(data)}
    return entry


# What every export verified before the piece was accepted (export/onnx_export.py).
CHECKS = {
    "onnx_checker": "onnx.checker.check_model(full_check=True)",
    "symbolic_axes": "every intended dynamic axis is a dim_param in the saved graph",
    "denied_ops": sorted(DENIED_OPS),
    "custom_domains": "refused",
    "parity": "ONNX Runtime CPU vs eager fp32 at the export shape and two others; max abs and max abs / max |eager| per output",
}


def _manifest(model: ScanModel, records: dict[str, PieceExport], checkpoint_hash: str | None, tolerance: float) -> dict:
    import onnx
    import onnxruntime

    cfg = model.cfg
    inf = cfg.inference
    pieces = {}
    for name, record in records.items():
        pieces[name] = _piece_entry(record, tolerance)
        if record.fp16 is not None:
            pieces[name]["fp16"] = _piece_entry(record.fp16, FP16_TOLERANCE)
    return {
        "schema_version": SCHEMA_VERSION,
        "checks": CHECKS,
        "model": {"name": cfg.name, "config": cfg.to_dict(), "checkpoint_sha256": checkpoint_hash},
        "preprocess": {
            "pixel_mean": list(inf.pixel_mean),
            "pixel_std": list(inf.pixel_std),
            "clip_mean": model.clip_mean.flatten().tolist(),
            "clip_std": model.clip_std.flatten().tolist(),
            "clip_fill": model.clip_fill.flatten().tolist(),
            "clip_image_size": cfg.clip.vision["image_size"],
            "size_divisibility": inf.size_divisibility,
            "min_size_test": inf.min_size_test,
            "max_size_test": inf.max_size_test,
        },
        "inference": {
            "mask_threshold": inf.mask_threshold,
            "ensemble_weight": inf.ensemble_weight,
            "replace_ratio": inf.replace_ratio,
            "replace_layers": list(inf.replace_layers),
            "shift_rule": inf.shift_rule,
            "shift_seed": inf.shift_seed,
            "log_ensemble": inf.log_ensemble,
            "logit_scale": 100.0,
            "num_queries": cfg.mask_decoder.num_queries,
        },
        "non_object_embedding": torch.nn.functional.normalize(model.non_object_embedding.detach(), dim=-1)[0].tolist(),
        "pieces": pieces,
        "tokenizer": {"bpe": "tokenizer/bpe_simple_vocab_16e6.txt.gz", "context_length": cfg.clip.text["context_length"],
                      "sot": 49406, "eot": 49407},
        "templates": {"vild": list(VILD_TEMPLATES)},
        "versions": {
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
    }


def _text_caches(model: ScanModel, root: Path, vocabularies: dict[str, list[str]], manifest: dict) -> dict:
    """Template-averaged class embeddings, keyed by text-encoder hash, template set and vocabulary."""
    encoder = manifest["pieces"].get("text_encoder", {}).get("sha256", "eager")[:16]
    caches = {}
    folder = root / "text_cache"
    for name, names in vocabularies.items():
        with torch.no_grad():
            embeddings = encode_class_names(model.clip, names, VILD_TEMPLATES).numpy().astype(np.float32)
        folder.mkdir(exist_ok=True)
        file = folder / f"{encoder}-vild-{name}.npz"
        with open(file, "wb") as handle:
            np.savez(handle, names=np.asarray(names), embeddings=embeddings)
        caches[name] = {"file": f"text_cache/{file.name}", "encoder": encoder, "templates": "vild", "classes": len(names)}
    return caches


def _copy_tokenizer(root: Path) -> None:
    from open_clip.tokenizer import default_bpe

    (root / "tokenizer").mkdir()
    shutil.copyfile(default_bpe(), root / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz")

"""The bundle: ONNX pieces, tokenizer data, text caches and `manifest.json`, written atomically.

The bundle is built in a temporary sibling folder and renamed into place only when every
piece has passed its checks, so an interrupted or failed export leaves any previous bundle
at that path intact and no half-written folder behind.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from runtime.errors import BundleError
from runtime.files import replace_folder, sha256_file
from runtime.manifest import (
    MANIFEST,
    SCHEMA_VERSION,
    BenchmarkSetting,
    FileRecord,
    InferenceDefaults,
    Manifest,
    ModelInfo,
    ParityRecord,
    Piece,
    PieceFile,
    PipelineCheck,
    Preprocess,
    TensorSpec,
    TextCache,
    Tokenizer,
    file_record,
    write_manifest,
)
from runtime.settings import BENCHMARK_SETTINGS, benchmark_settings
from scan_model.model import LOGIT_SCALE, ScanModel
from scan_model.text import VILD_TEMPLATES, encode_class_names

from .onnx_export import (
    DENIED_OPS,
    EXTERNAL_DATA_BYTES,
    FP16_TOLERANCE,
    INT8_TOLERANCE,
    OPSET,
    SENSITIVITY_MULTIPLE,
    SENSITIVITY_NOISE,
    ExportError,
    PieceExport,
    Shape,
    export_all,
)
from .pieces import PIECES
from .tensorrt import ShapeRanges

__all__ = ["MANIFEST", "BundleError", "check_destination", "check_precision", "engine_precision", "sha256_file",
           "write_bundle"]

# Variants a bundle may add to its fp32 pieces: fp16 (for TensorRT), int8 (ONNX Runtime on CPU).
EXTRA_PRECISIONS = ("fp16", "int8")


def check_precision(precision: str) -> tuple[str, ...]:
    """`--precision` ("fp32", "fp16", "int8", or a comma-separated list) -> the extra variants, e.g. ("int8",)."""
    names = [p.strip() for p in str(precision).split(",")]
    unknown = [p for p in names if p not in ("fp32", *EXTRA_PRECISIONS)]
    if unknown:
        raise BundleError(f"--precision {precision!r}: choose fp32, fp16, int8 or a comma-separated list (e.g. fp16,int8)")
    return tuple(p for p in EXTRA_PRECISIONS if p in names)


def engine_precision(precision: str) -> str:
    """TensorRT engines are built from the fp16 pieces when there are some, else from fp32 (never int8)."""
    return "fp16" if "fp16" in check_precision(precision) else "fp32"


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
    calibration: str | Path | None = None,
    report=print,
) -> Manifest:
    """Export `pieces`, gate them, add tokenizer data and text caches; return the manifest.

    `precision` "fp16" adds an fp16 variant of every piece (for TensorRT), "int8" a calibrated
    int8 variant of the pieces in `export.int8.INT8_PIECES` (ONNX Runtime and OpenVINO on CPU;
    `calibration`: images or a dataset, default the gate's drawn scenes, export/calibration.py),
    "fp16,int8" both; fp32 pieces are always written. With all four pieces, int8 files and
    OpenVINO's bf16 (where this CPU is native) are measured against fp32 piece by piece
    (export/precision_checks.py) and recorded. `tensorrt` builds engines from the fp16 pieces if any, else fp32.
    With all four pieces, `runtime.Segmenter` then runs the bundle being written and must give
    eager's labels (the end-to-end gate).
    """
    extras = check_precision(precision)
    if "int8" in extras and set(pieces) != set(PIECES):
        raise BundleError("--precision int8 calibrates on the whole pipeline: export all four pieces")
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
        records = export_all(model, tmp, example, list(checks), tolerance, pieces, fp16="fp16" in extras,
                             external_data_bytes=external_data_bytes, report=report)
        bpe = _copy_tokenizer(tmp)
        manifest = _manifest(model, records, tmp, checkpoint_hash, tolerance, bpe)
        manifest.text_caches = _text_caches(model, tmp, vocabularies, manifest)
        if set(records) == set(PIECES):
            write_manifest(tmp, manifest)  # the fp32 bundle segments the calibration images
            manifest = reduced_precision(model, records, tmp, manifest, [example, *checks], "int8" in extras,
                                         calibration, lambda: _manifest(model, records, tmp, checkpoint_hash,
                                                                        tolerance, bpe), report)
        if tensorrt:
            from .engines import build_bundle_engines

            sources = {n: (r.fp16 if "fp16" in extras else r).path for n, r in records.items()}
            manifest.engines = build_bundle_engines(tmp, sources, ranges or ShapeRanges(), engine_precision(precision),
                                                    trt_backend, report)
        write_manifest(tmp, manifest)
        if set(records) == set(PIECES):
            manifest.pipeline_check = pipeline_check(model, tmp, [example, *checks], precision, report)
            write_manifest(tmp, manifest)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def reduced_precision(model: ScanModel, records: dict, root: Path, manifest: Manifest, shapes: list[Shape],
                      int8: bool, calibration, remake, report=print) -> Manifest:
    """Record the calibration calls on the fp32 bundle at `root`, add the int8 files (`int8`), and
    measure them and OpenVINO's bf16 against fp32 per piece: the manifest with those records.
    `remake()` rebuilds the manifest from `records` once the int8 variants are in them."""
    from .calibration import calibration_set, record_pieces
    from .int8 import DYNAMIC_METHOD, INT8_PIECES, METHOD, QUANTISED_SCOPES
    from .onnx_export import add_int8
    from .precision_checks import check_piece

    images = calibration_set(calibration, shapes)
    recording = record_pieces(root, images)
    report(f"calibration: {images.describe()}, " + ", ".join(f"{n} {len(c)} calls" for n, c in recording.inputs.items()))
    if int8:
        import nncf
        import onnxruntime

        add_int8(model, records, root, recording.inputs, shapes[0], shapes[1:], report=report)
        caches, manifest = manifest.text_caches, remake()
        manifest.text_caches = caches
        for name in INT8_PIECES:
            piece = manifest.pieces[name]
            variant = piece.int8
            variant.quantisation = {"method": METHOD, "scope": list(QUANTISED_SCOPES[name]), "calibration": images.describe(),
                                    "calls": len(recording.inputs[name]), "nncf": nncf.__version__}
            if piece.int8_dynamic is not None:
                piece.int8_dynamic.quantisation = {"method": DYNAMIC_METHOD, "onnxruntime": onnxruntime.__version__}
            # Each engine is checked on the file it runs (Piece.variant).
            for engine in ("onnxruntime", *(("openvino",) if _openvino_available() else ())):
                variant = piece.variant("int8", engine)
                check = check_piece(name, root / variant.file, variant.sha256, recording, engine, "int8", images.describe())
                variant.precision_checks.append(check)
                _report_check(name, check, report)
                if not check.passed:
                    raise ExportError(f"{name}: int8 on {engine} keeps a cosine of {min(check.min_cosine.values()):.4f} "
                                      f"to fp32, under {check.required_cosine}: calibrate on images like the deployment's "
                                      "(--calibration DIR) or export without int8")
    from runtime.cpu import cpu_info

    cpu = cpu_info()
    if not _openvino_available() or not cpu.native_bf16:
        report(f"bf16: not measured ({'OpenVINO is not installed' if not _openvino_available() else cpu.model + ' has no native BF16'})")
        return manifest
    for name, piece in manifest.pieces.items():
        check = check_piece(name, root / piece.file, piece.sha256, recording, "openvino", "bf16", images.describe(), cpu=cpu)
        piece.precision_checks.append(check)
        _report_check(name, check, report)
    return manifest


def _report_check(name: str, check, report) -> None:
    worst = min(check.min_cosine, key=check.min_cosine.get)
    verdict = "passed" if check.passed else f"under {check.required_cosine}: " + (
        "the runtime runs it f32" if check.precision == "bf16" else "refused")
    report(f"{name}: {check.precision} on {check.engine} ({check.compiled}): cosine to fp32 >= "
           f"{check.min_cosine[worst]:.5f} ({worst}), relative error <= {max(check.max_rel.values()):.1e} over "
           f"{check.calls} calls, {verdict}")


def _openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


# Share of pixels with eager's label. fp32 / fp16: DESIGN.md. int8 (calibrated, docs/performance.md):
# the trained tiny gave 99.61% on these drawn scenes and the tiny test bundle passes; random weights
# label most scenes with one class, so this bound says little on its own: the per-piece numeric
# gate (export/precision_checks.py) is what measures the quantisation.
PIPELINE_AGREEMENT = {"fp32": 0.999, "fp16": 0.99, "int8": 0.98}
# Mask probabilities this close to the threshold may fall on either side under float rounding.
THRESHOLD_ROUNDING = 1e-5


def pipeline_check(model: ScanModel, root: Path, shapes: list[Shape], precision: str, report=print) -> dict:
    """End-to-end gate: `runtime.Segmenter` on the bundle at `root` gives eager's labels.

    One drawn scene per shape (no resize), ten ADE names; eager (fp32) runs once per scene and
    serves every variant (fp32 and the extras of `precision`), each with its own bound in
    `PIPELINE_AGREEMENT`. The runtime encodes the names with the bundle's own text encoder, into
    a temporary text cache (the user's cache is left alone). A mask pixel within float rounding
    of the threshold can land on the other side in a sound export and change a region's crop,
    and with it that region's labels; where the labels disagree beyond the bound, such pixels
    are given eager's side and the run repeated (`conditioned_agreement`). Pixels that flip
    further from the threshold are never excused.
    """
    from runtime.segmenter import Segmenter
    from runtime.vocab import benchmark_vocabularies
    from runtime.synthetic import synthetic_scene

    vocabulary = benchmark_vocabularies()["ade150"][:10]
    with torch.no_grad():
        classifier = model.text_classifier(model.encode_text(vocabulary))
    variants = ("fp32", *check_precision(precision))
    results: dict[str, list[PipelineCheck]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory(prefix="scan-gate-text-") as cache:
        runtimes = {v: Segmenter(root, backend="onnxruntime", precision=v, resize=False, cache_dir=cache) for v in variants}
        for segmenter in runtimes.values():
            segmenter.set_vocabulary(vocabulary)
        for shape in shapes:
            image = synthetic_scene(shape.height, shape.width, seed=3)
            with torch.no_grad():
                eager = model(torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float(), classifier)
            expected = eager.sem_seg.argmax(0).numpy()
            for variant, segmenter in runtimes.items():
                check = _compare(segmenter, image, expected, eager.mask_probs.numpy(), PIPELINE_AGREEMENT[variant])
                check.image, check.classes = f"drawn scene {shape.height}x{shape.width}", len(vocabulary)
                results[variant].append(check)
    for variant, checks in results.items():
        worst = min(max(c.label_agreement, c.conditioned_agreement or 0.0) for c in checks)
        flips = sum(c.threshold_flips for c in checks)
        report(f"pipeline ({variant}): runtime labels identical to eager on {worst:.4%} of pixels or more over "
               f"{len(checks)} scenes" + (f" ({flips} mask pixels within rounding of the threshold resolved)" if flips else ""))
        failed = [c for c in checks if not c.passed]
        if failed:
            raise ExportError(f"the {variant} bundle run by the runtime differs from eager: " + "; ".join(
                f"{c.image}: {c.label_agreement:.4%} identical labels"
                + (f" ({c.conditioned_agreement:.4%} with {c.threshold_flips} near-threshold mask pixels resolved)"
                   if c.conditioned_agreement is not None else "")
                + f", need {c.required:.1%}" for c in failed))
    return results


def _compare(segmenter, image, expected: np.ndarray, eager_probs: np.ndarray, required: float) -> PipelineCheck:
    from runtime.segmenter import _Clock

    settings = segmenter.settings
    clock = _Clock({})
    proposals = segmenter._propose(image, clock)
    labels, *_ = segmenter._decide(image, proposals, settings, image.shape[:2], False, clock)
    check = PipelineCheck("", 0, float((labels == expected).mean()), required)
    if check.label_agreement >= required:
        return check
    thr = settings.mask_threshold
    flipped = (proposals.probs > thr) != (eager_probs > thr)
    if not flipped.any() or np.abs(proposals.probs[flipped] - thr).max() >= THRESHOLD_ROUNDING:
        return check  # nothing to excuse, or flips beyond rounding: the raw agreement decides
    proposals.probs[flipped] = eager_probs[flipped]
    labels, *_ = segmenter._decide(image, proposals, settings, image.shape[:2], False, clock)
    check.threshold_flips = int(flipped.sum())
    check.conditioned_agreement = float((labels == expected).mean())
    return check


_DTYPES = {1: "float32", 7: "int64", 9: "bool", 10: "float16"}


def _io_contract(proto_path: Path) -> dict[str, list[TensorSpec]]:
    import onnx

    proto = onnx.load(str(proto_path), load_external_data=False)

    def describe(values) -> list[TensorSpec]:
        return [
            TensorSpec(v.name, _DTYPES.get(v.type.tensor_type.elem_type, str(v.type.tensor_type.elem_type)),
                       [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in values
        ]

    return {"inputs": describe(proto.graph.input), "outputs": describe(proto.graph.output)}


def _piece_file(record: PieceExport, root: Path, tolerance: float, multiple: float) -> dict:
    own = file_record(root, record.path)
    return dict(
        file=own.file, sha256=own.sha256, bytes=own.bytes, precision=record.precision, opset=OPSET,
        op_count=record.op_count, **_io_contract(record.path),
        parity=[ParityRecord(**asdict(p)) for p in record.parity], parity_tolerance=tolerance,
        parity_sensitivity_multiple=multiple,
        external_data=file_record(root, record.files()[1]) if record.external_data else None,
    )


# What every export verified before the piece was accepted (export/onnx_export.py).
CHECKS = {
    "onnx_checker": "onnx.checker.check_model(full_check=True)",
    "symbolic_axes": "every intended dynamic axis is a dim_param in the saved graph",
    "denied_ops": sorted(DENIED_OPS),
    "custom_domains": "refused",
    "parity": "ONNX Runtime CPU vs eager fp32 at the export shape and two others; max abs and max abs / max |eager| per "
              f"output, within max(parity_tolerance, {SENSITIVITY_MULTIPLE:g} x eager_sensitivity), where eager_sensitivity "
              f"is how far eager moves when its float inputs get {SENSITIVITY_NOISE:g} relative noise; bool outputs exact",
    "reduced_precision": "int8 files (ONNX Runtime and OpenVINO) and OpenVINO bf16 against fp32 on the calibration calls: "
                         "per output the smallest cosine and the largest max abs / max |fp32|; int8 is refused and a bf16 "
                         "piece runs f32 where a cosine falls under required_cosine",
    "pipeline": "runtime.Segmenter on the bundle vs the eager model: identical labels on drawn scenes at every checked shape",
}


def _manifest(model: ScanModel, records: dict[str, PieceExport], root: Path, checkpoint_hash: str | None,
              tolerance: float, bpe: FileRecord) -> Manifest:
    import onnx
    import onnxruntime

    cfg = model.cfg
    inf = cfg.inference
    pieces = {}
    for name, record in records.items():
        pieces[name] = Piece(**_piece_file(record, root, tolerance, SENSITIVITY_MULTIPLE))
        if record.fp16 is not None:
            pieces[name].fp16 = PieceFile(**_piece_file(record.fp16, root, FP16_TOLERANCE, 0.0))
        if record.int8 is not None:
            pieces[name].int8 = PieceFile(**_piece_file(record.int8, root, INT8_TOLERANCE, 0.0))
        if record.int8_dynamic is not None:
            pieces[name].int8_dynamic = PieceFile(**_piece_file(record.int8_dynamic, root, INT8_TOLERANCE, 0.0))
    return Manifest(
        schema_version=SCHEMA_VERSION,
        checks=CHECKS,
        model=ModelInfo(cfg.name, json.loads(json.dumps(cfg.to_dict())), checkpoint_hash),  # as JSON reads it back
        preprocess=Preprocess(
            pixel_mean=list(inf.pixel_mean),
            pixel_std=list(inf.pixel_std),
            clip_mean=model.clip_mean.flatten().tolist(),
            clip_std=model.clip_std.flatten().tolist(),
            clip_fill=model.clip_fill.flatten().tolist(),
            clip_image_size=cfg.clip.vision["image_size"],
            size_divisibility=inf.size_divisibility,
            min_size_test=inf.min_size_test,
            max_size_test=inf.max_size_test,
        ),
        inference=InferenceDefaults(
            mask_threshold=inf.mask_threshold,
            ensemble_weight=inf.ensemble_weight,
            replace_ratio=inf.replace_ratio,
            replace_layers=list(inf.replace_layers),
            shift_rule=inf.shift_rule,
            shift_seed=inf.shift_seed,
            log_ensemble=inf.log_ensemble,
            logit_scale=LOGIT_SCALE,
            num_queries=cfg.mask_decoder.num_queries,
            shift_patches=cfg.clip.grid_size ** 2,
            benchmark_settings={
                name: BenchmarkSetting(**values)
                for name in BENCHMARK_SETTINGS.get(cfg.name, {})
                if (values := benchmark_settings(cfg.name, name)) is not None
            },
        ),
        non_object_embedding=torch.nn.functional.normalize(model.non_object_embedding.detach(), dim=-1)[0].tolist(),
        pieces=pieces,
        tokenizer=Tokenizer(bpe=bpe, context_length=cfg.clip.text["context_length"], sot=49406, eot=49407),
        templates={"vild": list(VILD_TEMPLATES)},
        versions={
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "python": platform.python_version(),
        },
    )


def _text_caches(model: ScanModel, root: Path, vocabularies: dict[str, list[str]], manifest: Manifest) -> dict[str, TextCache]:
    """Template-averaged class embeddings, keyed by text-encoder hash, template set and vocabulary."""
    encoder = manifest.pieces["text_encoder"].sha256[:16] if "text_encoder" in manifest.pieces else "eager"
    caches = {}
    folder = root / "text_cache"
    for name, names in vocabularies.items():
        with torch.no_grad():
            embeddings = encode_class_names(model.clip, names, VILD_TEMPLATES).numpy().astype(np.float32)
        folder.mkdir(exist_ok=True)
        file = folder / f"{encoder}-vild-{name}.npz"
        with open(file, "wb") as handle:
            np.savez(handle, names=np.asarray(names), embeddings=embeddings)
        record = file_record(root, file)
        caches[name] = TextCache(record.file, record.sha256, record.bytes, encoder=encoder, templates="vild", classes=len(names))
    return caches


def _copy_tokenizer(root: Path) -> FileRecord:
    from open_clip.tokenizer import default_bpe

    (root / "tokenizer").mkdir()
    target = root / "tokenizer" / "bpe_simple_vocab_16e6.txt.gz"
    shutil.copyfile(default_bpe(), target)
    return file_record(root, target)

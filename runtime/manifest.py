"""`manifest.json`, the contract between a bundle's writer (`export/`) and its readers.

One typed, versioned description of a bundle: export writes it through `write_manifest`,
and the runtime, `scan doctor` and the engine code read it through `read_manifest`. A
manifest from a newer schema, with a missing field or a value of the wrong type is refused
with one line that says which field and what to do, never a KeyError deep in the runtime.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BundleError

# 2: clip_adapter takes the contextual-shift counts and keys as inputs (per-call replace
#    ratio and shift rule); every file carries its size.
SCHEMA_VERSION = 2
MANIFEST = "manifest.json"


@dataclass
class TensorSpec:
    name: str
    dtype: str
    shape: list[Any]  # ints for fixed axes, names for symbolic ones


@dataclass
class ParityRecord:
    """ONNX Runtime against eager at one shape, per output."""

    shape: str
    max_abs: dict[str, float]
    max_rel: dict[str, float]  # max |ort - eager| / max |eager|
    # How far eager itself moves when its float inputs get float-rounding noise: a parity value
    # of this size is the model's conditioning there, not the export.
    eager_sensitivity: dict[str, float] = field(default_factory=dict)


@dataclass
class PrecisionCheck:
    """A reduced-precision run of a piece against its fp32 outputs on the calibration calls
    (export/precision_checks.py): per output, the smallest cosine and the largest
    max |low - fp32| / max |fp32| (bool outputs: the smallest share of equal values, and 1 where
    any differs). `passed`: every cosine at least `required_cosine`."""

    engine: str  # "onnxruntime" or "openvino"
    precision: str  # "int8" (the int8 file) or "bf16" (the fp32 file compiled with OpenVINO's bf16 hint)
    compiled: str  # what ran: OpenVINO's settings after any fallback (e.g. "bf16-nosnippets-t2"), or "onnxruntime"
    inputs: str  # where the calls came from
    calls: int
    min_cosine: dict[str, float]
    max_rel: dict[str, float]
    required_cosine: float
    passed: bool


@dataclass
class FileRecord:
    file: str  # relative to the bundle
    sha256: str
    bytes: int


@dataclass
class PieceFile:
    file: str
    sha256: str
    bytes: int
    precision: str
    opset: int
    op_count: int
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parity: list[ParityRecord]
    parity_tolerance: float
    # ONNX Runtime passed where max_rel <= max(parity_tolerance, multiple x eager_sensitivity);
    # 0 where only the fixed tolerance applied (fp16 pieces).
    parity_sensitivity_multiple: float = 0.0
    external_data: FileRecord | None = None
    # Reduced precision against fp32 (int8 files: their own runs; fp32 pieces: bf16 on OpenVINO).
    precision_checks: list[PrecisionCheck] = field(default_factory=list)
    # int8 files: how they were made (method, scope, calibration, NNCF version).
    quantisation: dict[str, Any] | None = None

    def files(self) -> list[FileRecord]:
        own = FileRecord(self.file, self.sha256, self.bytes)
        return [own] + ([self.external_data] if self.external_data else [])

    def input(self, name: str) -> TensorSpec:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        raise BundleError(f"piece {self.file} has no input {name!r}: re-export the bundle with `scan export`")


@dataclass
class Piece(PieceFile):
    fp16: PieceFile | None = None
    # Calibrated QDQ file (ONNX Runtime and OpenVINO); absent for pieces that stay fp32 (export/int8.py).
    int8: PieceFile | None = None
    # Dynamically quantised file that ONNX Runtime runs instead of the QDQ one, for the pieces it
    # runs faster that way (export.int8.DYNAMIC_PIECES, measured in docs/performance.md).
    int8_dynamic: PieceFile | None = None

    def bf16_check(self) -> PrecisionCheck | None:
        """The export's bf16 check of this piece on OpenVINO; None where the exporting CPU had no native BF16."""
        return next((c for c in self.precision_checks if c.precision == "bf16" and c.engine == "openvino"), None)

    def variant(self, precision: str, engine: str | None = None) -> PieceFile:
        """The file `engine` runs at `precision`; int8 falls back to fp32 for pieces without an int8
        variant, and ONNX Runtime takes the dynamically quantised file where there is one. bf16
        has no files of its own: OpenVINO compiles the fp32 pieces with a bf16 hint."""
        if precision in ("fp32", "bf16"):
            return self
        if precision == "int8":
            if engine == "onnxruntime" and self.int8_dynamic is not None:
                return self.int8_dynamic
            return self.int8 if self.int8 is not None else self
        if precision == "fp16" and self.fp16 is not None:
            return self.fp16
        raise BundleError(f"{self.file} has no {precision} variant: export with `scan export --precision {precision}`")


@dataclass
class ModelInfo:
    name: str
    config: dict[str, Any]
    checkpoint_sha256: str | None


@dataclass
class Preprocess:
    pixel_mean: list[float]
    pixel_std: list[float]
    clip_mean: list[float]
    clip_std: list[float]
    clip_fill: list[float]
    clip_image_size: int
    size_divisibility: int
    min_size_test: int
    max_size_test: int


@dataclass
class BenchmarkSetting:
    """The official test settings of one benchmark (SPEC §5.3)."""

    mask_threshold: float
    ensemble_weight: float
    replace_ratio: float
    log_ensemble: bool


@dataclass
class InferenceDefaults:
    mask_threshold: float
    ensemble_weight: float
    replace_ratio: float
    replace_layers: list[int]
    shift_rule: str
    shift_seed: int
    log_ensemble: bool
    logit_scale: float
    num_queries: int
    shift_patches: int  # P = CLIP grid side squared: length of the shift key
    benchmark_settings: dict[str, BenchmarkSetting] = field(default_factory=dict)


@dataclass
class Tokenizer:
    bpe: FileRecord
    context_length: int
    sot: int
    eot: int


@dataclass
class TextCache(FileRecord):
    encoder: str = ""  # first 16 hex digits of the text_encoder piece's sha256
    templates: str = "vild"
    classes: int = 0


@dataclass
class EnginePlan(FileRecord):
    onnx: str = ""
    profile: dict[str, dict[str, list[int]]] = field(default_factory=dict)


@dataclass
class EngineFolder:
    backend: str  # tensorrt or tensorrt_rtx
    version: str
    gpu: str
    precision: str
    ranges: dict[str, list[int]]
    timing_cache: str | None
    pieces: dict[str, EnginePlan]


@dataclass
class PipelineCheck:
    """The runtime's labels against eager's on one drawn scene (the export's end-to-end gate)."""

    image: str
    classes: int
    label_agreement: float  # share of pixels with eager's label
    required: float
    # Mask pixels whose side of the mask threshold differs from eager's, all within float rounding
    # of it, and the agreement once those pixels take eager's side (None when there were none).
    threshold_flips: int = 0
    conditioned_agreement: float | None = None

    @property
    def passed(self) -> bool:
        best = max(self.label_agreement, self.conditioned_agreement or 0.0)
        return best >= self.required


@dataclass
class Manifest:
    schema_version: int
    model: ModelInfo
    preprocess: Preprocess
    inference: InferenceDefaults
    non_object_embedding: list[float]
    pieces: dict[str, Piece]
    tokenizer: Tokenizer
    templates: dict[str, list[str]]
    text_caches: dict[str, TextCache] = field(default_factory=dict)
    engines: dict[str, EngineFolder] = field(default_factory=dict)
    pipeline_check: dict[str, list[PipelineCheck]] = field(default_factory=dict)
    checks: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check_variant(self, precision: str) -> None:
        """An int8 run needs at least one int8 piece (the others run fp32); fp16 is checked per piece."""
        if precision == "int8" and all(piece.int8 is None for piece in self.pieces.values()):
            raise BundleError("this bundle has no int8 pieces: export with `scan export --precision int8`")

    def files(self) -> list[FileRecord]:
        """Every file the manifest vouches for: pieces (every precision), tokenizer, caches, engines."""
        records: list[FileRecord] = []
        for piece in self.pieces.values():
            records += piece.files()
            for variant in (piece.fp16, piece.int8, piece.int8_dynamic):
                if variant is not None:
                    records += variant.files()
        records.append(self.tokenizer.bpe)
        records += list(self.text_caches.values())
        for folder in self.engines.values():
            records += list(folder.pieces.values())
        return records


def file_record(root: Path, path: Path) -> FileRecord:
    """The record of `path` (inside `root`): relative name, sha256 and size."""
    from .files import sha256_file

    return FileRecord(path.relative_to(root).as_posix(), sha256_file(path), path.stat().st_size)


def manifest_from_dict(data: Any, source: str = MANIFEST) -> Manifest:
    """Check the schema version first, then every field's presence and type."""
    if not isinstance(data, dict):
        raise BundleError(f"{source} holds {type(data).__name__}, not a manifest object: re-export the bundle")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise BundleError(f"{source} has no integer schema_version: re-export the bundle with `scan export`")
    if version > SCHEMA_VERSION:
        raise BundleError(
            f"{source} has schema {version}, newer than this scan-deploy reads ({SCHEMA_VERSION}): "
            "upgrade scan-deploy (pip install -U scan-deploy)"
        )
    if version < SCHEMA_VERSION:
        raise BundleError(
            f"{source} has schema {version}, older than this scan-deploy reads ({SCHEMA_VERSION}): "
            "re-export the bundle with `scan export`"
        )
    return _parse(Manifest, data, "", source)


def read_manifest(bundle: str | Path) -> Manifest:
    """The typed manifest of the bundle folder `bundle`; BundleError with one line otherwise."""
    root = Path(bundle)
    path = root / MANIFEST
    if not root.is_dir():
        raise BundleError(f"bundle folder not found: {root} (pass the folder `scan export --out` wrote)")
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle (no {MANIFEST}): pass the folder `scan export --out` wrote")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is damaged ({exc}): re-export the bundle with `scan export`") from None
    return manifest_from_dict(data, str(path))


def manifest_json(manifest: Manifest) -> str:
    """Stable text (sorted keys, no timestamp): two exports of the same inputs are byte-identical."""
    return json.dumps(manifest.to_dict(), indent=1, sort_keys=True) + "\n"


def write_manifest(bundle: str | Path, manifest: Manifest) -> Path:
    from .files import atomic_write

    path = Path(bundle) / MANIFEST
    text = manifest_json(manifest)
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


# ------------------------------------------------------------------------------------------
# A small typed reader for the dataclasses above.


def _parse(tp: Any, value: Any, where: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [t for t in options if t is not type(None)]
        return _parse(inner, value, where, source)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _wrong(where, "an object", value, source)
        hints = typing.get_type_hints(tp)
        kwargs = {}
        for f in dataclasses.fields(tp):
            name = f"{where}.{f.name}" if where else f.name
            if f.name not in value:
                has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
                if has_default:
                    continue
                raise BundleError(f"{source}: field {name!r} is missing: re-export the bundle with `scan export`")
            kwargs[f.name] = _parse(hints[f.name], value[f.name], name, source)
        return tp(**kwargs)
    if origin is list:
        if not isinstance(value, list):
            _wrong(where, "a list", value, source)
        (item,) = typing.get_args(tp)
        return [_parse(item, v, f"{where}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            _wrong(where, "an object", value, source)
        _, item = typing.get_args(tp)
        return {str(k): _parse(item, v, f"{where}.{k}", source) for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _wrong(where, "a number", value, source)
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _wrong(where, "an integer", value, source)
        return value
    if tp in (str, bool):
        if not isinstance(value, tp):
            _wrong(where, "a string" if tp is str else "true or false", value, source)
        return value
    raise TypeError(f"manifest type {tp!r} of {where} is not handled")  # a bug here, not user input


def _wrong(where: str, expected: str, value: Any, source: str) -> None:
    found = "null" if value is None else type(value).__name__
    raise BundleError(f"{source}: field {where!r} should be {expected}, found {found}: re-export the bundle with `scan export`")

"""Exporting one piece to ONNX, and the checks every export runs.

Exporter: `torch.onnx.export(..., dynamo=True)` at opset 18 (EXPORT_NOTES §1). Because the
dynamo exporter can silently turn a dynamic dimension into a constant, every export is
followed by checks that fail loudly: the intended axes must be symbolic in the saved graph,
no operator from the deny list may appear, `onnx.checker` must pass in full, and ONNX Runtime
must agree with eager at shapes other than the export example.

Parity is judged against eager's own conditioning. Where mask logits sit within float rounding
of zero, the masked attention of the mask decoder flips whole attention blocks under any change
of summation order, so eager itself moves by 1e-3 to 1e-1 relative when its inputs get 1e-7
relative noise, and no correct export can agree with it better than that. Each parity check
therefore also measures that movement (`eager_sensitivity`: eager against eager on the same
inputs with float-rounding noise) and accepts ONNX Runtime within
`max(tolerance, SENSITIVITY_MULTIPLE x sensitivity)`; both numbers go to the manifest, and the
end-to-end label gate (export/bundle.py) decides whether such a model is fit to ship.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch.export import Dim

from runtime.errors import ScanError
from scan_model.model import ScanModel

from .pieces import PIECES, example_inputs

OPSET = 18
# Pieces whose weights exceed this go to ONNX external data (protobuf's limit is 2 GB).
EXTERNAL_DATA_BYTES = 1_800_000_000
# fp16 per piece only catches a broken conversion (non-finite, or errors as large as the outputs):
# on random example inputs the mask decoder's masked attention turns fp16 rounding into flipped
# blocks (up to 0.57 relative measured at 256x384, tiny, random weights). What decides an fp16
# export is the end-to-end gate in bundle.py: >= 99% identical labels (DESIGN.md).
FP16_TOLERANCE = 1.0
# int8 against eager at the export shapes (random inputs, outside the calibration), like fp16, only
# catches a broken quantisation (non-finite outputs, or errors of half the outputs' size); the
# numeric gate on the calibration calls (export/precision_checks.py) measures it. Measured worst
# at the export shapes with the calibrated files: 0.31 (tiny test bundle), 0.16 (trained tiny).
INT8_TOLERANCE = 0.5
# Ops that TensorRT rejects or that make shapes data-dependent (EXPORT_NOTES §1, §4.1).
DENIED_OPS = frozenset({"DFT", "STFT", "NonZero", "Loop", "If", "RoiAlign", "Scan"})
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})

# Eager sensitivity (see the module docstring). Float inputs of rank >= 1 are multiplied by
# (1 + NOISE * n), n ~ N(0, 1) drawn from SEED, computed in float64 and rounded back: a change of
# about one float32 ulp. Integer and bool inputs and 0-d settings (the mask threshold) stay as they
# are. Draws come in antithetic pairs (n, -n): a flip needs the perturbation of one near-zero logit
# to have the right sign, which one of the pair has. One pair is always measured; more pairs,
# up to MAX_PAIRS, only where ONNX Runtime is beyond the gate with the movement measured so far
# (single draws caught the flip of seed-8 official-format tiny at 320x480 in 3 of 10, pairs in 4 of 8).
SENSITIVITY_NOISE = 1e-7
SENSITIVITY_SEED = 5
SENSITIVITY_PAIRS = 1
SENSITIVITY_MAX_PAIRS = 8
# ONNX Runtime may move up to this multiple of eager's own movement. Measured ORT / sensitivity
# (tiny official-format seeds 0, 3, 8, 20, every piece at the bundle's three shapes; vitb in
# benchmarks/results/export_vitb_320x480.json): exactly 1.00 where blocks flip (ORT flips the same
# block the noise does: 9.4e-3 vs 9.4e-3, 1.5e-3 vs 1.5e-3), 0.6-1.6 where nothing flips. 10 leaves
# room for ORT flipping another block than the draws did, and a wrong graph (errors far above
# rounding) still fails wherever the model is well-conditioned.
SENSITIVITY_MULTIPLE = 10.0


class ExportError(ScanError, RuntimeError):
    """An export that produced a graph we must not ship; the message says which check failed."""


@dataclass
class Shape:
    """One test point of a piece: image size (multiples of 32), vocabulary size K, masks N."""

    height: int
    width: int
    classes: int
    masks: int

    def label(self) -> str:
        return f"{self.height}x{self.width} K={self.classes} N={self.masks}"


@dataclass
class ParityResult:
    shape: str
    max_abs: dict[str, float] = field(default_factory=dict)
    max_rel: dict[str, float] = field(default_factory=dict)  # max abs diff / max abs eager value
    # The same measure for eager against eager on float-rounding-perturbed inputs (float outputs).
    eager_sensitivity: dict[str, float] = field(default_factory=dict)


@dataclass
class PieceExport:
    name: str
    path: Path
    seconds: float
    op_count: int
    op_types: dict[str, int]
    dynamic_axes: dict[str, list[str | int]]
    parity: list[ParityResult] = field(default_factory=list)
    precision: str = "fp32"
    external_data: bool = False
    fp16: PieceExport | None = None  # the fp16 variant, when one was asked for
    int8: PieceExport | None = None  # the calibrated int8 variant, for the pieces of INT8_PIECES
    int8_dynamic: PieceExport | None = None  # ONNX Runtime's dynamic int8 variant, for DYNAMIC_PIECES
    exact_outputs: list[str] = field(default_factory=list)  # bool outputs: must match eager exactly

    def files(self) -> list[Path]:
        """The ONNX file and, for pieces over 2 GB, its external-data file."""
        return [self.path, *([_data_path(self.path)] if self.external_data else [])]

    def worst_rel(self) -> float:
        return max((v for p in self.parity for v in p.max_rel.values()), default=0.0)

    def worst_sensitivity(self) -> float:
        return max((v for p in self.parity for v in p.eager_sensitivity.values()), default=0.0)


def dynamic_shapes(piece: str, model: ScanModel) -> dict:
    """The symbolic axes of each piece's inputs (H, W as multiples of 32; K+1; N; M)."""
    h32, w32 = Dim("h32", min=1, max=80), Dim("w32", min=1, max=80)
    k = Dim("classes_plus_one", min=2, max=65536)
    if piece == "image_encoder":
        return {"image": {2: 32 * h32, 3: 32 * w32}, "clip_image": None}
    if piece == "mask_decoder":
        return {
            "mask_features": {2: 8 * h32, 3: 8 * w32},
            "features_0": {2: h32, 3: w32},
            "features_1": {2: 2 * h32, 3: 2 * w32},
            "features_2": {2: 4 * h32, 3: 4 * w32},
            "clip_context": None,
            "global_cls": None,
            "text_classifier": {0: k},
        }
    if piece == "clip_adapter":
        height, width, masks = Dim("height", min=2, max=2560), Dim("width", min=2, max=2560), Dim("masks", min=1, max=1024)
        return {
            "image": {1: height, 2: width},
            "mask_probs": {0: masks, 1: height, 2: width},
            "mask_threshold": None,
            "shift_tokens": None,
            "text_classifier": {0: k},
            "shift_counts": None,
            "shift_keys": {1: masks},
        }
    if piece == "text_encoder":
        context = model.cfg.clip.text["context_length"]
        return {"tokens": {0: Dim("prompts", min=1, max=65536), 1: Dim("sequence", min=2, max=context)}}
    raise ValueError(f"unknown piece {piece!r}")


def _data_path(path: Path) -> Path:
    return path.with_name(path.name + ".data")


def _weight_bytes(module: torch.nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in [*module.parameters(), *module.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def export_piece(
    model: ScanModel, piece: str, path: Path, example: Shape, external_data_bytes: int = EXTERNAL_DATA_BYTES
) -> PieceExport:
    """Export `piece` of `model` to `path` and run the structural checks (not parity)."""
    wrapper = PIECES[piece](model).eval()
    external = _weight_bytes(wrapper) > external_data_bytes
    args = example_inputs(model, piece, example.height, example.width, example.classes, example.masks)
    shapes = dynamic_shapes(piece, model)
    start = time.perf_counter()
    try:
        program = torch.onnx.export(
            wrapper,
            args,
            dynamo=True,
            opset_version=OPSET,
            input_names=list(wrapper.input_names),
            output_names=list(wrapper.output_names),
            dynamic_shapes=shapes,
            external_data=external,
            verbose=False,
        )
    except Exception as exc:  # the exporter raises many types; one clear line for the user
        raise ExportError(f"{piece}: torch.onnx.export failed: {str(exc).strip().splitlines()[0]}") from exc
    program.save(str(path), external_data=external)
    seconds = time.perf_counter() - start
    proto = onnx.load(str(path), load_external_data=False)
    record = PieceExport(piece, path, seconds, len(proto.graph.node), _op_histogram(proto), _graph_axes(proto),
                         external_data=external)
    check_graph(proto, piece, shapes, wrapper.input_names, path)
    return record


def export_fp16(record: PieceExport, path: Path) -> PieceExport:
    """The fp16 variant of an exported fp32 piece (see export/fp16.py), with the same checks."""
    from .fp16 import convert_to_fp16

    start = time.perf_counter()
    half = convert_to_fp16(onnx.load(str(record.path)), record.name)
    external = record.external_data  # the fp16 variant keeps the layout of its fp32 source
    onnx.save(half, str(path), save_as_external_data=external, location=_data_path(path).name)
    fp16 = PieceExport(record.name, path, time.perf_counter() - start, len(half.graph.node), _op_histogram(half),
                       _graph_axes(half), precision="fp16", external_data=external)
    shapes = {name: {i: None for i, d in enumerate(dims) if isinstance(d, str)} for name, dims in record.dynamic_axes.items()}
    check_graph(half, record.name, shapes, [v.name for v in half.graph.input], path)
    return fp16


def export_int8(record: PieceExport, path: Path, feeds: list[dict[str, np.ndarray]] | None, report=None) -> PieceExport:
    """The int8 variant of an exported fp32 piece (see export/int8.py), with the same structural
    checks: calibrated on `feeds` (its recorded calls), or dynamic for ONNX Runtime (None)."""
    from .int8 import quantize_dynamic_piece, quantize_piece

    start = time.perf_counter()
    try:
        if feeds is None:
            quantize_dynamic_piece(record.name, record.path, path, external_data=record.external_data, report=report)
        else:
            quantize_piece(record.name, record.path, path, feeds, external_data=record.external_data, report=report)
    except Exception as exc:  # the quantiser raises many types; one clear line for the user
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ExportError(f"{record.name}: int8 quantisation failed: {first}") from exc
    proto = onnx.load(str(path), load_external_data=False)
    int8 = PieceExport(record.name, path, time.perf_counter() - start, len(proto.graph.node), _op_histogram(proto),
                       _graph_axes(proto), precision="int8", external_data=record.external_data)
    shapes = {name: {i: None for i, d in enumerate(dims) if isinstance(d, str)} for name, dims in record.dynamic_axes.items()}
    check_graph(proto, record.name, shapes, [v.name for v in proto.graph.input], path)
    return int8


def add_int8(model: ScanModel, records: dict[str, PieceExport], out_dir: Path, feeds: dict[str, list[dict]],
             example: Shape, checks: list[Shape], tolerance: float = INT8_TOLERANCE, report=None) -> None:
    """Calibrated int8 variants (`<piece>.int8.onnx`) of the pieces of `INT8_PIECES`, each checked
    like any export and its parity against eager bounded by `tolerance` (a broken quantisation
    only: export/precision_checks.py is the gate that measures the error against fp32)."""
    from .int8 import DYNAMIC_PIECES, INT8_PIECES

    for piece in INT8_PIECES:
        record = records[piece]
        record.int8 = export_int8(record, out_dir / f"{piece}.int8.onnx", feeds[piece], report)
        if piece in DYNAMIC_PIECES:
            record.int8_dynamic = export_int8(record, out_dir / f"{piece}.int8-dynamic.onnx", None, report)
        for variant, label in ((record.int8, "int8"), (record.int8_dynamic, "int8 dynamic")):
            if variant is None:
                continue
            for low, full in zip(ort_parity(model, variant, [example, *checks], sensitivity=False), record.parity):
                low.eager_sensitivity = dict(full.eager_sensitivity)
            parity_gate(variant, tolerance, multiple=0.0)  # bool outputs stay exact: computed in fp32
            if report is not None:
                report(f"{piece}: {label} parity worst {variant.worst_rel():.1e} against eager over {len(record.parity)} shapes")


def _op_histogram(proto: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in _all_nodes(proto):
        key = node.op_type if node.domain in STANDARD_DOMAINS else f"{node.domain}::{node.op_type}"
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def _all_nodes(proto: onnx.ModelProto):
    yield from proto.graph.node
    for function in proto.functions:
        yield from function.node


def _graph_axes(proto: onnx.ModelProto) -> dict[str, list[str | int]]:
    axes = {}
    for value in list(proto.graph.input) + list(proto.graph.output):
        axes[value.name] = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
    return axes


def check_graph(proto: onnx.ModelProto, piece: str, shapes: dict, input_names, path: Path | None = None) -> None:
    """Full checker, symbolic intended axes, no denied operators or custom domains."""
    try:
        # The checker reads a path when weights live in external data (protos over 2 GB).
        onnx.checker.check_model(str(path) if path is not None else proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"{piece}: onnx.checker failed: {str(exc).splitlines()[0]}") from None
    axes = _graph_axes(proto)
    for name in input_names:
        for axis in (shapes.get(name) or {}):
            dim = axes[name][axis]
            if not isinstance(dim, str) or not dim:
                raise ExportError(
                    f"{piece}: axis {axis} of input {name!r} was meant to be dynamic but is fixed to {dim} in the graph"
                )
    bad = sorted({n.op_type for n in _all_nodes(proto) if n.op_type in DENIED_OPS})
    custom = sorted({f"{n.domain}::{n.op_type}" for n in _all_nodes(proto) if n.domain not in STANDARD_DOMAINS})
    if bad or custom:
        raise ExportError(f"{piece}: graph holds denied operators {bad + custom}")


def _relative(ours: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """Max abs difference and max abs difference / max |ref| (float64)."""
    if not ref.size:
        return 0.0, 0.0
    diff = float(np.abs(ours.astype(np.float64) - ref.astype(np.float64)).max())
    return diff, diff / max(float(np.abs(ref).max()), 1e-30)


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _perturb(args, noise: float, gen: torch.Generator, sign: float = 1.0, draw=None) -> tuple[list, list]:
    """`args` with float inputs (rank >= 1) times (1 + sign * noise * n); returns them and the draws n."""
    draws = draw if draw is not None else [
        torch.randn(a.shape, generator=gen, dtype=torch.float64) if a.is_floating_point() and a.dim() else None for a in args
    ]
    noisy = [a if n is None else (a.double() * (1 + sign * noise * n)).to(a.dtype) for a, n in zip(args, draws)]
    return noisy, draws


@torch.no_grad()
def _movement(wrapper: torch.nn.Module, args, reference: tuple, pair: int, noise: float, seed: int) -> dict[str, float]:
    """Max relative change of each float output over one antithetic pair of perturbations."""
    gen = torch.Generator().manual_seed(seed + pair)
    moved: dict[str, float] = {}
    draw = None
    for sign in (1.0, -1.0):
        noisy, draw = _perturb(args, noise, gen, sign, draw)
        for name, out, ref in zip(wrapper.output_names, _as_tuple(wrapper(*noisy)), reference):
            if ref.is_floating_point():
                value = _relative(out.numpy(), ref.numpy())[1]
                moved[name] = max(moved.get(name, 0.0), value if math.isfinite(value) else 0.0)
    return moved


def _merge_max(into: dict[str, float], new: dict[str, float]) -> None:
    for name, value in new.items():
        into[name] = max(into.get(name, 0.0), value)


def _limit(tolerance: float, multiple: float, sensitivity: float) -> float:
    return max(tolerance, multiple * sensitivity) if math.isfinite(sensitivity) else tolerance


@torch.no_grad()
def ort_parity(
    model: ScanModel, record: PieceExport, shapes: list[Shape], providers=("CPUExecutionProvider",),
    tolerance: float = 1e-3, multiple: float = SENSITIVITY_MULTIPLE, sensitivity: bool = True,
    eager_cache: dict | None = None,
) -> list[ParityResult]:
    """ONNX Runtime against eager at each shape: max abs and relative difference per output,
    and eager's own sensitivity to float-rounding noise (one antithetic pair; up to
    SENSITIVITY_MAX_PAIRS while an output is beyond `max(tolerance, multiple x sensitivity)`).

    `eager_cache` (a dict per piece) keeps the example inputs and eager outputs per shape, so that
    the variants of a piece (fp16, int8) are compared with eager without running it again."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if record.precision == "fp16":  # ORT 1.32's CPU NCHWc rewrite crashes on fp16 graphs (EXPORT_NOTES §2)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    session = ort.InferenceSession(str(record.path), options, providers=list(providers))
    wrapper = PIECES[record.name](model).eval()
    results = []
    for shape in shapes:
        key = (record.name, shape.label())
        if eager_cache is not None and key in eager_cache:
            args, eager = eager_cache[key]
        else:
            args = example_inputs(model, record.name, shape.height, shape.width, shape.classes, shape.masks, seed=1)
            eager = _as_tuple(wrapper(*args))
            if eager_cache is not None:
                eager_cache[key] = args, eager
        feeds = {name: arg.numpy() for name, arg in zip(wrapper.input_names, args)}
        outputs = session.run(list(wrapper.output_names), feeds)
        result = ParityResult(shape.label())
        for name, ours, ref in zip(wrapper.output_names, outputs, eager):
            ref = ref.numpy()
            if ref.shape != ours.shape:
                raise ExportError(f"{record.name}: output {name} has shape {ours.shape} in ONNX Runtime, {ref.shape} eager")
            if ref.dtype == np.bool_:
                diff = float((ours != ref).mean()) if ref.size else 0.0
                result.max_abs[name] = result.max_rel[name] = diff
                if name not in record.exact_outputs:
                    record.exact_outputs.append(name)
                continue
            result.max_abs[name], result.max_rel[name] = _relative(ours, ref)
        if sensitivity:
            for pair in range(SENSITIVITY_MAX_PAIRS):
                _merge_max(result.eager_sensitivity, _movement(wrapper, args, eager, pair, SENSITIVITY_NOISE, SENSITIVITY_SEED))
                unexplained = [
                    n for n, v in result.eager_sensitivity.items()
                    if not result.max_rel[n] <= _limit(tolerance, multiple, v)
                ]
                if pair + 1 >= SENSITIVITY_PAIRS and not unexplained:
                    break
        results.append(result)
    record.parity.extend(results)
    return results


def parity_gate(record: PieceExport, tolerance: float, multiple: float = SENSITIVITY_MULTIPLE, exact=None) -> None:
    """Fail with a report when an output at a shape is beyond `max(tolerance, multiple x eager sensitivity)`.

    `exact` outputs (default: the piece's bool outputs) must match eager exactly. `multiple=0`
    with `exact=()` is a plain fixed-tolerance gate (fp16 variants).
    """
    exact = set(record.exact_outputs if exact is None else exact)
    failures = []
    for p in record.parity:
        for name, value in p.max_rel.items():
            if name in exact:
                if not value == 0:
                    failures.append(f"{p.shape} {name}: {value:.2e} of flags differ (must match exactly)")
                continue
            sensitivity = p.eager_sensitivity.get(name, 0.0)
            if not value <= _limit(tolerance, multiple, sensitivity):  # `not <=` so that NaN fails too
                failures.append(f"{p.shape} {name}: {value:.2e}" + (f" (eager sensitivity {sensitivity:.1e})" if multiple else ""))
    if failures:
        bound = f"max({tolerance:g}, {multiple:g} x eager sensitivity)" if multiple else f"{tolerance:g}"
        raise ExportError(f"{record.name}: ONNX Runtime differs from eager beyond {bound}: " + "; ".join(failures))


def export_all(
    model: ScanModel, out_dir: Path, example: Shape, checks: list[Shape], tolerance: float = 1e-3, pieces=tuple(PIECES),
    fp16: bool = False, fp16_tolerance: float = FP16_TOLERANCE, external_data_bytes: int = EXTERNAL_DATA_BYTES,
    report=None,
) -> dict[str, PieceExport]:
    """Each piece: export, structural checks, parity at the example and `checks` shapes, gate.

    With `fp16`, each piece also gets an fp16 variant (`<piece>.fp16.onnx`), gated against
    the fp32 eager model with `fp16_tolerance`. int8 variants need the whole fp32 bundle to
    calibrate on (`add_int8`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    records = {}
    for piece in pieces:
        record = export_piece(model, piece, out_dir / f"{piece}.onnx", example, external_data_bytes)
        eager: dict = {}  # eager's inputs and outputs per shape, shared by the piece's variants
        ort_parity(model, record, [example, *checks], tolerance=tolerance, eager_cache=eager)
        parity_gate(record, tolerance)
        line = (f"{piece}: {record.op_count} ops, {sum(f.stat().st_size for f in record.files()) / 1e6:.1f} MB, "
                f"exported in {record.seconds:.0f} s, parity worst {record.worst_rel():.1e} over {len(record.parity)} shapes "
                f"(eager sensitivity up to {record.worst_sensitivity():.1e})")
        if fp16:
            record.fp16 = export_fp16(record, out_dir / f"{piece}.fp16.onnx")
            # Same eager model, inputs and shapes: eager's sensitivity is the fp32 record's (recorded,
            # not used: the fp16 gate is a fixed tolerance, see FP16_TOLERANCE).
            for half, full in zip(ort_parity(model, record.fp16, [example, *checks], sensitivity=False, eager_cache=eager),
                                  record.parity):
                half.eager_sensitivity = dict(full.eager_sensitivity)
            parity_gate(record.fp16, fp16_tolerance, multiple=0.0, exact=())
            line += f"; fp16 worst {record.fp16.worst_rel():.1e}"
        if report is not None:
            report(line)
        records[piece] = record
    return records

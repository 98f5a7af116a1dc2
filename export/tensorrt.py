"""TensorRT: optimisation profiles, engine builds, and the TensorRT-RTX compatibility gate.

Written against the documented Python API that `tensorrt` (10, 11) and `tensorrt_rtx` share:
`Builder`, `OnnxParser.parse_from_file`, optimisation profiles, `build_serialized_network`.
Both modules are imported lazily: nothing here needs them unless a build is asked for.
TensorRT-RTX builds engines ahead of time on the CPU, so the gate runs without a GPU; it never
deserialises or runs an engine (that needs a GPU).
"""

from __future__ import annotations

import importlib
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import onnx

BACKENDS = ("tensorrt", "tensorrt_rtx")


class TensorRTUnavailable(RuntimeError):
    """No TensorRT module can be imported; the message says what to install."""


def load_tensorrt(prefer: tuple[str, ...] = BACKENDS):
    """The first importable TensorRT flavour, as (module, name)."""
    reasons = []
    for name in prefer:
        try:
            return importlib.import_module(name), name
        except Exception as exc:  # ImportError, or a broken install raising OSError
            reasons.append(f"{name}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    raise TensorRTUnavailable(
        "no TensorRT available (" + "; ".join(reasons) + "): install 'tensorrt' (GPU hosts, NVIDIA's index) "
        "or 'tensorrt-rtx' (builds engines ahead of time without a GPU)"
    )


def trt_version(trt, name: str) -> str:
    """Folder-name form of the version: 'trt10.13.3.9', 'trtrtx1.7.1.116'."""
    return ("trtrtx" if name == "tensorrt_rtx" else "trt") + trt.__version__


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def gpu_identity() -> tuple[str | None, str]:
    """(folder slug of GPU 0 such as 'nvidia-h100-80gb-hbm3-sm90', None if no GPU answers; a description)."""
    try:
        from cuda.bindings import runtime as cudart
    except Exception as exc:  # cuda-python missing or broken: no way to ask
        return None, f"cuda-python unavailable ({type(exc).__name__}); pip install cuda-python"
    error, count = cudart.cudaGetDeviceCount()
    if error != cudart.cudaError_t.cudaSuccess or not count:
        return None, f"no CUDA device answers ({getattr(error, 'name', error)})"
    error, prop = cudart.cudaGetDeviceProperties(0)
    if error != cudart.cudaError_t.cudaSuccess:
        return None, f"cudaGetDeviceProperties failed ({getattr(error, 'name', error)})"
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return f"{_slug(name)}-sm{prop.major}{prop.minor}", f"{name} (compute capability {prop.major}.{prop.minor})"


@dataclass
class ShapeRanges:
    """min / opt / max of the dynamic sizes; H and W are image sizes (multiples of 32)."""

    height: tuple[int, int, int] = (320, 640, 1024)
    width: tuple[int, int, int] = (320, 640, 1024)
    classes: tuple[int, int, int] = (1, 150, 1024)  # K, without the non-object row
    masks: tuple[int, int, int] = (1, 32, 100)  # regions per call of the CLIP adapter
    prompts: tuple[int, int, int] = (1, 14 * 16, 14 * 256)  # text-encoder batch

    def __post_init__(self) -> None:
        for name, (low, opt, high) in asdict(self).items():
            if not 1 <= low <= opt <= high:
                raise ValueError(f"{name} range {low},{opt},{high}: need 1 <= min <= opt <= max")
            if name in ("height", "width") and any(v % 32 for v in (low, opt, high)):
                raise ValueError(f"{name} range {low},{opt},{high}: image sizes must be multiples of 32")


def piece_profiles(piece: str, proto: onnx.ModelProto, ranges: ShapeRanges) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) shape of every dynamic input of `piece`, derived from the graph's static dims."""
    static = {
        v.name: [d.dim_value if not d.dim_param else None for d in v.type.tensor_type.shape.dim] for v in proto.graph.input
    }

    def fill(name: str, dyn: dict[int, tuple[int, int, int]]) -> tuple[tuple[int, ...], ...]:
        dims = static[name]
        return tuple(tuple(dyn[i][j] if i in dyn else dims[i] for i in range(len(dims))) for j in range(3))

    h, w = ranges.height, ranges.width
    k1 = tuple(k + 1 for k in ranges.classes)
    if piece == "image_encoder":
        return {"image": fill("image", {2: h, 3: w})}
    if piece == "mask_decoder":
        scale = lambda r, f: tuple(v // f for v in r)  # noqa: E731
        return {
            "mask_features": fill("mask_features", {2: scale(h, 4), 3: scale(w, 4)}),
            "features_0": fill("features_0", {2: scale(h, 32), 3: scale(w, 32)}),
            "features_1": fill("features_1", {2: scale(h, 16), 3: scale(w, 16)}),
            "features_2": fill("features_2", {2: scale(h, 8), 3: scale(w, 8)}),
            "text_classifier": fill("text_classifier", {0: k1}),
        }
    if piece == "clip_adapter":
        return {
            "image": fill("image", {1: h, 2: w}),
            "mask_probs": fill("mask_probs", {0: ranges.masks, 1: h, 2: w}),
            "text_classifier": fill("text_classifier", {0: k1}),
        }
    if piece == "text_encoder":
        return {"tokens": fill("tokens", {0: ranges.prompts})}
    raise ValueError(f"unknown piece {piece!r}")


@dataclass
class BuildResult:
    piece: str
    backend: str
    parsed: bool
    built: bool
    rejected: list[str] = field(default_factory=list)  # "node N (Op): message"
    engine_bytes: int = 0
    seconds: float = 0.0
    engine: bytes | None = None

    def summary(self) -> str:
        if self.parsed and not self.built and not self.rejected:
            return f"{self.piece}: parsed by {self.backend} (not built)"
        if self.built:
            return f"{self.piece}: built with {self.backend} ({self.engine_bytes / 1e6:.1f} MB, {self.seconds:.1f} s)"
        state = "build failed" if self.parsed else "parse failed"
        return f"{self.piece}: {state} with {self.backend}: " + "; ".join(self.rejected or ["no message"])


def _network_flags(trt, name: str, precision: str) -> int:
    """fp16 pieces carry their precision in the graph: TensorRT 10 and RTX must obey its types.

    TensorRT 11 is always strongly typed (the flag is deprecated and ignored there), and
    explicit batch is the only mode since TensorRT 10, so nothing else is needed.
    """
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    major = int(trt.__version__.split(".")[0])
    if precision == "fp16" and flag is not None and (name == "tensorrt_rtx" or major < 11):
        return 1 << int(flag)
    return 0


def _configure(trt, name: str, config, precision: str, timing_cache: Path | None):
    """Builder settings; returns the timing cache object to save after the build (or None)."""
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 is on by default and would break fp32 parity
    if name != "tensorrt" or timing_cache is None:
        return None  # TensorRT-RTX has no timing cache (its cache calls are no-ops)
    data = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(data)
    config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def build_engine(
    onnx_path: Path, piece: str, ranges: ShapeRanges, backend: str | None = None, keep_engine: bool = False,
    precision: str = "fp32", timing_cache: Path | None = None, parse_only: bool = False,
) -> BuildResult:
    """Parse `onnx_path` and build a serialized engine with one optimisation profile.

    `precision` says what the ONNX holds (fp16 pieces come from export/fp16.py); the timing
    cache, when given, is read before and written after the build (TensorRT only).
    """
    trt, name = load_tensorrt((backend,) if backend else BACKENDS)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, name, precision))
    parser = trt.OnnxParser(network, logger)
    proto = onnx.load(str(onnx_path), load_external_data=False)
    result = BuildResult(piece, name, parsed=bool(parser.parse_from_file(str(onnx_path))), built=False)
    if not result.parsed:
        for i in range(parser.num_errors):
            error = parser.get_error(i)
            node = error.node()
            op = proto.graph.node[node].op_type if 0 <= node < len(proto.graph.node) else "?"
            result.rejected.append(f"node {node} ({op}): {error.desc()}")
        return result
    if parse_only:
        return result
    config = builder.create_builder_config()
    cache = _configure(trt, name, config, precision, timing_cache)
    profile = builder.create_optimization_profile()
    for input_name, (low, opt, high) in piece_profiles(piece, proto, ranges).items():
        profile.set_shape(input_name, low, opt, high)
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    blob = builder.build_serialized_network(network, config)
    result.seconds = time.perf_counter() - start
    if blob is None:
        result.rejected.append("build_serialized_network returned nothing (see the TensorRT log above)")
        return result
    data = bytes(blob)
    result.built, result.engine_bytes = True, len(data)
    result.engine = data if keep_engine else None
    if cache is not None:
        timing_cache.write_bytes(bytes(cache.serialize()))
    return result

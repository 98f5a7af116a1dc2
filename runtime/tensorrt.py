"""TensorRT: loading a flavour, naming engine folders, optimisation profiles and engine builds.

Torch- and onnx-free, so a deployment host can build its engines lazily from a bundle. Written
against the documented Python API that `tensorrt` (10, 11) and `tensorrt_rtx` share: `Builder`,
`OnnxParser.parse_from_file`, optimisation profiles, `build_serialized_network`. Both modules are
imported lazily: nothing here needs them unless a build is asked for. TensorRT-RTX builds engines
ahead of time on the CPU, so builds run without a GPU; running an engine is `runtime/trt_engine.py`.
"""

from __future__ import annotations

import importlib
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from .errors import ScanError

BACKENDS = ("tensorrt", "tensorrt_rtx")

Profile = dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]  # input -> (min, opt, max)


class TensorRTUnavailable(ScanError):
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


def engine_folder_name(gpu_slug: str | None, backend_module_name: str, version: str, precision: str) -> str:
    """`<gpu>-trt<version>-<precision>`; `aot-trtrtx<version>-<precision>` for RTX without a GPU.

    Engines are tied to a GPU and a TensorRT version, so the name carries both and a bundle can
    hold engines for several machines side by side without ever mixing them.
    """
    if backend_module_name not in BACKENDS:
        raise ValueError(f"unknown TensorRT module {backend_module_name!r}: expected one of {BACKENDS}")
    if gpu_slug is None:
        if backend_module_name != "tensorrt_rtx":  # only RTX builds ahead of time without a GPU
            raise ValueError("standard TensorRT builds for the GPU it runs on: a GPU slug is required")
        gpu_slug = "aot"
    prefix = "trtrtx" if backend_module_name == "tensorrt_rtx" else "trt"
    return f"{gpu_slug}-{prefix}{version}-{precision}"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def gpu_identity() -> tuple[str | None, str]:
    """(folder slug of GPU 0 such as 'nvidia-h100-80gb-hbm3-sm90', None if no GPU answers; a description)."""
    try:
        from cuda.bindings import runtime as cudart
    except Exception as exc:  # cuda-python missing or broken: ask pycuda, the other supported binding
        return _pycuda_identity(f"cuda-python unavailable ({type(exc).__name__}); pip install cuda-python")
    error, count = cudart.cudaGetDeviceCount()
    if error != cudart.cudaError_t.cudaSuccess or not count:
        return None, f"no CUDA GPU answers ({getattr(error, 'name', error)})"
    error, prop = cudart.cudaGetDeviceProperties(0)
    if error != cudart.cudaError_t.cudaSuccess:
        return None, f"cudaGetDeviceProperties failed ({getattr(error, 'name', error)})"
    name = prop.name.decode(errors="replace").rstrip("\x00") if isinstance(prop.name, bytes) else str(prop.name)
    return f"{_slug(name)}-sm{prop.major}{prop.minor}", f"{name} (compute capability {prop.major}.{prop.minor})"


def _pycuda_identity(reason: str) -> tuple[str | None, str]:
    try:
        import pycuda.driver as drv

        drv.init()
        if not drv.Device.count():
            return None, f"no CUDA GPU answers (pycuda: 0 devices); {reason}"
        device = drv.Device(0)
        major, minor = device.compute_capability()
    except Exception:  # pycuda missing, or its driver calls failing: no GPU to name
        return None, reason
    return f"{_slug(device.name())}-sm{major}{minor}", f"{device.name()} (compute capability {major}.{minor})"


@dataclass
class ShapeRanges:
    """min / opt / max of the dynamic sizes; H and W are image sizes (multiples of 32)."""

    height: tuple[int, int, int] = (320, 640, 1024)
    width: tuple[int, int, int] = (320, 640, 1024)
    classes: tuple[int, int, int] = (1, 150, 1024)  # K, without the non-object row
    masks: tuple[int, int, int] = (1, 32, 100)  # regions per call of the CLIP adapter
    prompts: tuple[int, int, int] = (1, 14 * 16, 14 * 256)  # text-encoder batch
    sequence: tuple[int, int, int] = (2, 16, 77)  # tokens per prompt, cut to the batch's longest

    def __post_init__(self) -> None:
        for name, (low, opt, high) in asdict(self).items():
            if not 1 <= low <= opt <= high:
                raise ValueError(f"{name} range {low},{opt},{high}: need 1 <= min <= opt <= max")
            if name in ("height", "width") and any(v % 32 for v in (low, opt, high)):
                raise ValueError(f"{name} range {low},{opt},{high}: image sizes must be multiples of 32")

    @classmethod
    def from_dict(cls, data: Mapping[str, Sequence[int]]) -> "ShapeRanges":
        """The ranges a manifest or sidecar recorded (lists in JSON)."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: tuple(int(x) for x in v) for k, v in data.items() if k in known})


def _axis_ranges(piece: str, ranges: ShapeRanges) -> dict[str, dict[int, tuple[int, int, int]]]:
    """Which axis of which input follows which range; the layouts are export/pieces.py's."""
    h, w = ranges.height, ranges.width
    k1 = tuple(k + 1 for k in ranges.classes)  # the text classifier carries the non-object row
    scale = lambda r, f: tuple(v // f for v in r)  # noqa: E731
    if piece == "image_encoder":
        return {"image": {2: h, 3: w}}
    if piece == "mask_decoder":
        return {
            "mask_features": {2: scale(h, 4), 3: scale(w, 4)},
            "features_0": {2: scale(h, 32), 3: scale(w, 32)},
            "features_1": {2: scale(h, 16), 3: scale(w, 16)},
            "features_2": {2: scale(h, 8), 3: scale(w, 8)},
            "text_classifier": {0: k1},
        }
    if piece == "clip_adapter":
        return {
            "image": {1: h, 2: w},
            "mask_probs": {0: ranges.masks, 1: h, 2: w},
            "text_classifier": {0: k1},
            "shift_keys": {1: ranges.masks},
        }
    if piece == "text_encoder":
        return {"tokens": {0: ranges.prompts, 1: ranges.sequence}}
    raise ValueError(f"unknown piece {piece!r}")


def piece_profiles(piece: str, inputs: Mapping[str, Sequence[int | str]], ranges: ShapeRanges) -> Profile:
    """(min, opt, max) shape of every dynamic input of `piece`.

    `inputs` maps input names to dims as a bundle manifest records them: ints for fixed axes,
    strings (or -1) for symbolic ones. Fixed dims are kept; symbolic ones take their range.
    """
    table = _axis_ranges(piece, ranges)
    profile: Profile = {}
    for name, dims in inputs.items():
        symbolic = [i for i, d in enumerate(dims) if isinstance(d, str) or d is None or d < 0]
        if not symbolic:
            continue  # fully static inputs need no profile
        axes = table.get(name, {})
        uncovered = [i for i in symbolic if i not in axes]
        if uncovered:  # a piece whose contract changed without this table: fail here, not in the builder
            raise ScanError(
                f"{piece} input {name!r} has symbolic axes {uncovered} that no TensorRT shape range covers: "
                "this scan-deploy does not match the bundle's export; re-export it or upgrade scan-deploy"
            )
        profile[name] = tuple(
            tuple(axes[i][j] if i in symbolic else int(d) for i, d in enumerate(dims)) for j in range(3)
        )
    return profile


def profile_record(profile: Profile) -> dict[str, dict[str, list[int]]]:
    """The JSON form a manifest or sidecar stores: name -> {min, opt, max}."""
    return {name: {"min": list(low), "opt": list(opt), "max": list(high)} for name, (low, opt, high) in profile.items()}


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
    profile: Profile = field(default_factory=dict)  # what the engine was built for

    def summary(self) -> str:
        if self.parsed and not self.built and not self.rejected:
            return f"{self.piece}: parsed by {self.backend} (not built)"
        if self.built:
            return f"{self.piece}: built with {self.backend} ({self.engine_bytes / 1e6:.1f} MB, {self.seconds:.1f} s)"
        state = "build failed" if self.parsed else "parse failed"
        return f"{self.piece}: {state} with {self.backend}: " + "; ".join(self.rejected or ["no message"])


def collecting_logger(trt, keep: int = 20):
    """A TensorRT logger that keeps the last error messages, so failures can quote them in one line."""

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.ERROR, trt.ILogger.Severity.INTERNAL_ERROR):
                self.errors = (self.errors + [" ".join(str(msg).split())])[-keep:]

    return _Logger()


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


def _node_op(error, onnx_path: Path) -> str:
    """The op type of a node the parser rejected; onnx is optional, so fall back to '?'."""
    op = getattr(error, "node_operator", None)  # TensorRT >= 8.6 and RTX report it themselves
    if op is not None and op():
        return op()
    try:
        import onnx
    except ImportError:
        return "?"
    nodes = onnx.load(str(onnx_path), load_external_data=False).graph.node
    return nodes[error.node()].op_type if 0 <= error.node() < len(nodes) else "?"


def _network_inputs(network) -> dict[str, list[int | str]]:
    """Input dims of the parsed network, -1 (dynamic) written as a symbolic name as a manifest would."""
    dims = {}
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims[tensor.name] = [d if d >= 0 else f"dynamic{j}" for j, d in enumerate(tensor.shape)]
    return dims


def build_engine(
    onnx_path: Path, piece: str, ranges: ShapeRanges, backend: str | None = None, keep_engine: bool = False,
    precision: str = "fp32", timing_cache: Path | None = None, parse_only: bool = False,
    inputs: Mapping[str, Sequence[int | str]] | None = None,
) -> BuildResult:
    """Parse `onnx_path` and build a serialized engine with one optimisation profile.

    `precision` says what the ONNX holds (fp16 pieces come from export/fp16.py); `inputs` are
    the piece's input dims as the manifest records them (default: read from the parsed network);
    the timing cache, when given, is read before and written after the build (TensorRT only).
    """
    from .files import atomic_write

    trt, name = load_tensorrt((backend,) if backend else BACKENDS)
    logger = collecting_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt, name, precision))
    parser = trt.OnnxParser(network, logger)
    result = BuildResult(piece, name, parsed=bool(parser.parse_from_file(str(onnx_path))), built=False)
    if not result.parsed:
        for i in range(parser.num_errors):
            error = parser.get_error(i)
            result.rejected.append(f"node {error.node()} ({_node_op(error, onnx_path)}): {error.desc()}")
        return result
    if parse_only:
        return result
    config = builder.create_builder_config()
    cache = _configure(trt, name, config, precision, timing_cache)
    profile = builder.create_optimization_profile()
    result.profile = piece_profiles(piece, inputs if inputs is not None else _network_inputs(network), ranges)
    for input_name, (low, opt, high) in result.profile.items():
        profile.set_shape(input_name, low, opt, high)
    config.add_optimization_profile(profile)
    start = time.perf_counter()
    blob = builder.build_serialized_network(network, config)
    result.seconds = time.perf_counter() - start
    if blob is None:
        reason = logger.errors[-1] if logger.errors else "no message"
        result.rejected.append(f"build_serialized_network returned nothing: {reason}")
        return result
    data = bytes(blob)
    result.built, result.engine_bytes = True, len(data)
    result.engine = data if keep_engine else None
    if cache is not None:
        serialized = bytes(cache.serialize())
        atomic_write(timing_cache, lambda tmp: tmp.write_bytes(serialized))
    return result

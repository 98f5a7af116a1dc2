"""Running a bundle piece with ONNX Runtime (CPU, CUDA or its TensorRT execution provider)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np

from .errors import ScanError

GRAPH_OPTIMIZATION = ("disable", "basic", "extended", "all")


class BackendError(ScanError):
    """A backend that cannot run here; the message says what to install or change."""


def default_providers() -> list[str]:
    """CUDA (then CPU) where onnxruntime-gpu sees a usable build, else CPU.

    ONNX Runtime's own TensorRT provider is left to explicit requests: it builds engines of
    its own on first use, which takes minutes; the `tensorrt` backend uses the bundle's.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available] or ["CPUExecutionProvider"]


def _provider_name(provider) -> str:
    return provider[0] if isinstance(provider, (tuple, list)) else str(provider)


class OnnxRuntimeRunner:
    """One piece in an `onnxruntime.InferenceSession`: numpy feeds in, numpy outputs out.

    Args:
        name: the piece's name (for messages).
        path: its ONNX file.
        providers: execution providers in order of preference (names or (name, options)).
        threads: intra-op threads; None lets ONNX Runtime use every core.
        optimization: graph optimisation level, one of `GRAPH_OPTIMIZATION`.
        precision: "fp16" pieces run at "extended" at most on CPU, where ONNX Runtime 1.32's
            NCHWc layout rewrite of fp16 graphs crashes (EXPORT_NOTES §2).
    """

    def __init__(self, name: str, path: Path, providers=None, threads: int | None = None,
                 optimization: str = "all", precision: str = "fp32"):
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendError("onnxruntime is not installed: pip install onnxruntime (CPU) or onnxruntime-gpu") from None
        if optimization not in GRAPH_OPTIMIZATION:
            raise BackendError(f"graph optimisation {optimization!r}: choose one of {', '.join(GRAPH_OPTIMIZATION)}")
        if threads is not None and threads < 1:
            raise BackendError(f"threads must be at least 1, got {threads}")
        providers = list(providers) if providers else default_providers()
        known = ort.get_available_providers()
        unknown = [_provider_name(p) for p in providers if _provider_name(p) not in known]
        if unknown:
            raise BackendError(
                f"execution provider(s) {', '.join(unknown)} are not in this onnxruntime build "
                f"(it has {', '.join(known)}): install onnxruntime-gpu for CUDA/TensorRT, or pass providers from that list"
            )
        if precision == "fp16" and optimization == "all" and all(_provider_name(p) == "CPUExecutionProvider" for p in providers):
            optimization = "extended"
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = levels[optimization]
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.name, self.path = name, Path(path)
        self.session = ort.InferenceSession(os.fspath(path), options, providers=providers)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        # A provider that fails to load (missing CUDA libraries) is dropped silently by ONNX
        # Runtime: compare what runs with what was asked for.
        running = self.session.get_providers()
        dropped = [_provider_name(p) for p in providers if _provider_name(p) not in running]
        self.fell_back = dropped
        if dropped:
            warnings.warn(
                f"{name}: ONNX Runtime could not start {', '.join(dropped)} and runs on {', '.join(running)} "
                "(check the CUDA/cuDNN/TensorRT libraries; `scan doctor` reports them)",
                RuntimeWarning,
                stacklevel=3,
            )

    @property
    def providers(self) -> list[str]:
        return self.session.get_providers()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.session.run(self.output_names, feeds)
        return dict(zip(self.output_names, outputs))

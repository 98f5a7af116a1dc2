"""The backend and precision a `Segmenter` runs when the caller leaves them unset.

The rule follows the measurements in docs/performance.md (CPU figures from one `scan bench` run
each): on a CPU, OpenVINO is the fastest engine for every piece, and bf16 doubles its speed where
the CPU executes bfloat16 natively; where onnxruntime-gpu sees a CUDA device, ONNX Runtime on
that GPU. int8 is never chosen for the caller: it changes the results beyond rounding, so it is
a decision to take with the bundle's recorded agreement at hand.
"""

from __future__ import annotations

import importlib.util

from .cpu import CpuInfo, cpu_info


def _cuda_available() -> bool:
    try:
        import onnxruntime as ort
    except ImportError:
        return False
    return "CUDAExecutionProvider" in ort.get_available_providers()


def choose(backend: str | None, precision: str | None, cpu: CpuInfo | None = None) -> tuple[str, str, list[str]]:
    """(backend, precision, notes): what was asked, with unset ones filled in, and why."""
    notes: list[str] = []
    if backend is None:
        if _cuda_available():
            backend, why = "onnxruntime", "onnxruntime-gpu sees a CUDA device"
        elif importlib.util.find_spec("openvino") is not None:
            backend, why = "openvino", "the fastest CPU engine measured (docs/performance.md)"
        else:
            backend, why = "onnxruntime", "openvino is not installed"
        notes.append(f"backend {backend}: {why}")
    if precision is None:
        cpu = cpu or cpu_info()
        if backend == "openvino" and cpu.native_bf16:
            precision, why = "bf16", f"{cpu.model} executes BF16 natively"
        else:
            precision = "fp32"
            why = "no native BF16 on this CPU" if backend == "openvino" else f"the {backend} default"
        notes.append(f"precision {precision}: {why}")
    return backend, precision, notes

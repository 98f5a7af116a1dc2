"""What a benchmark ran on: machine, library versions and thread counts."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from contextlib import contextmanager

from runtime.cpu import cpu_info

# Distributions that provide a module, in order of preference (onnxruntime-gpu provides `onnxruntime`).
DISTRIBUTIONS = {
    "numpy": ("numpy",),
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "onnx": ("onnx",),
    "openvino": ("openvino",),
    "nncf": ("nncf",),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
    "tensorrt_rtx": ("tensorrt-rtx", "tensorrt_rtx"),
    "scan-deploy": ("scan-deploy",),
}


def total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine() -> dict:
    cpu = cpu_info()
    return {
        "cpu": cpu.model,
        "cpu_features": cpu.features(),  # AVX2, AVX-512, VNNI, native BF16, AMX: stated next to every figure
        "logical_cores": os.cpu_count(),
        "memory_bytes": total_memory_bytes(),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


def versions() -> dict[str, str | None]:
    """Installed versions (None where a library is absent), read without importing the libraries."""
    found = {}
    for key, names in DISTRIBUTIONS.items():
        found[key] = None
        for name in names:
            try:
                found[key] = importlib.metadata.version(name)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return found


@contextmanager
def torch_threads(threads: int):
    """PyTorch's intra-op threads set for the block and restored after (the setting is process-wide)."""
    try:
        import torch
    except ImportError:  # a runtime-only install: nothing to set
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def thread_counts(threads: int) -> dict[str, int | None]:
    """What each library was told (ONNX Runtime's inter-op pool is 1: the runtime's sessions run sequential graphs)."""
    try:
        import torch

        intra, inter = torch.get_num_threads(), torch.get_num_interop_threads()
    except ImportError:
        intra = inter = None
    return {"torch_intra_op": intra, "torch_inter_op": inter, "onnxruntime_intra_op": threads, "onnxruntime_inter_op": 1,
            "openvino_inference_threads": threads}

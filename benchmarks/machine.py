"""What a benchmark ran on: machine, library versions and thread counts."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from contextlib import contextmanager
from pathlib import Path

# Distributions that provide a module, in order of preference (onnxruntime-gpu provides `onnxruntime`).
DISTRIBUTIONS = {
    "numpy": ("numpy",),
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "onnx": ("onnx",),
    "tensorrt": ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"),
    "tensorrt_rtx": ("tensorrt-rtx", "tensorrt_rtx"),
    "scan-deploy": ("scan-deploy",),
}


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def machine() -> dict:
    return {
        "cpu": cpu_model(),
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
    return {"torch_intra_op": intra, "torch_inter_op": inter, "onnxruntime_intra_op": threads, "onnxruntime_inter_op": 1}

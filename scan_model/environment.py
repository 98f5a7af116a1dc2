"""`scan doctor`: versions, backends and devices, and why a backend is unavailable."""

from __future__ import annotations

import importlib
import platform


def _version(module_name: str) -> tuple[str | None, str | None]:
    """(version, None) when importable, else (None, reason)."""
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure is a reason to report, not to crash on
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'not installed'}"
    return str(getattr(module, "__version__", "unknown")), None


def environment_report() -> list[str]:
    lines = [f"python        {platform.python_version()} ({platform.machine()}, {platform.system()})"]
    for name in ("torch", "open_clip", "onnx", "onnxscript", "numpy", "PIL", "safetensors", "typer"):
        version, reason = _version(name)
        lines.append(f"{name:<13} {version or 'unavailable: ' + str(reason)}")

    lines.append("backends:")
    lines.append("  eager        available (PyTorch)")
    version, reason = _version("onnxruntime")
    if version:
        import onnxruntime

        providers = ", ".join(onnxruntime.get_available_providers())
        lines.append(f"  onnxruntime  {version} (compiled-in providers: {providers})")
    else:
        lines.append(f"  onnxruntime  unavailable: {reason} (pip install 'scan-deploy[cpu]' or [gpu])")
    for module, label in (("tensorrt", "tensorrt"), ("tensorrt_rtx", "tensorrt_rtx")):
        version, reason = _version(module)
        lines.append(f"  {label:<12} {version or 'unavailable: ' + str(reason)}")

    lines.append("devices:")
    try:
        import torch

        if torch.cuda.is_available():
            for i in range(torch.cuda.device_count()):
                lines.append(f"  cuda:{i}       {torch.cuda.get_device_name(i)}")
        else:
            lines.append(f"  cuda         none (torch {torch.__version__} sees no CUDA device; TensorRT and CUDA providers cannot run)")
    except Exception as exc:  # report, do not crash
        lines.append(f"  cuda         unknown ({exc})")
    return lines

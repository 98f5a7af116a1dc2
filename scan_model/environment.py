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
    lines.extend(tensorrt_report())

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


def tensorrt_report() -> list[str]:
    """Which TensorRT flavours import, whether a GPU answers, and so what `--tensorrt` can do here."""
    from export.tensorrt import gpu_identity

    gpu, description = gpu_identity()
    lines = []
    for module in ("tensorrt", "tensorrt_rtx"):
        version, reason = _version(module)
        if not version:
            hint = "GPU hosts: pip install tensorrt (NVIDIA's index)" if module == "tensorrt" else "pip install tensorrt-rtx"
            lines.append(f"  {module:<12} unavailable: {reason} ({hint})")
        elif gpu:
            lines.append(f"  {module:<12} {version}: builds and runs engines on {description}")
        elif module == "tensorrt":
            lines.append(f"  {module:<12} {version}: cannot build or run engines here: {description}")
        else:
            lines.append(f"  {module:<12} {version}: builds engines ahead of time (compatibility gate); "
                         f"cannot run them here: {description}")
    return lines


def bundle_report(root, build: bool) -> list[str]:
    """The bundle's recorded parity and engines, and the TensorRT gate run now on its pieces."""
    import json

    from export.engines import gate_bundle
    from export.tensorrt import TensorRTUnavailable

    manifest = json.loads((root / "manifest.json").read_text())
    lines = [f"bundle {root} (schema {manifest.get('schema_version')}, model {manifest['model']['name']})"]
    for name, piece in manifest["pieces"].items():
        worst = max(v for p in piece["parity"] for v in p["max_rel"].values())
        extra = " + fp16" if "fp16" in piece else ""
        lines.append(f"  {name:<14} {piece['op_count']} ops{extra}, ONNX Runtime parity worst {worst:.1e}")
    for folder, info in manifest.get("engines", {}).items():
        lines.append(f"  engines/{folder}: {', '.join(info['pieces'])} ({info['backend']} {info['version']})")
    precisions = ["fp32"] + (["fp16"] if all("fp16" in p for p in manifest["pieces"].values()) else [])
    lines.append("TensorRT gate (" + ("parse and build" if build else "parse only; --build to build too") + "):")
    for precision in precisions:
        try:
            results = gate_bundle(root, precision, build=build)
        except TensorRTUnavailable as exc:
            lines.append(f"  skipped: {exc}")
            break
        lines.extend(f"  [{precision}] {r.summary()}" for r in results)
    return lines

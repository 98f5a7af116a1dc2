"""`scan doctor`: versions, backends and devices, why a backend is unavailable, and a bundle's state.

Runs on a runtime-only install too: PyTorch and the export tools are reported as optional.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import platform
from pathlib import Path


def _version(module_name: str) -> tuple[str | None, str | None]:
    """(version, None) when importable, else (None, reason)."""
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # any import failure is a reason to report, not to crash on
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'not installed'}"
    return str(getattr(module, "__version__", "unknown")), None


def _distributions(*names: str) -> list[str]:
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return found


def serve_report() -> str:
    """Whether `scan serve` can start Triton here, and why not."""
    from runtime.serving import hosting_problem, shared_libpython

    installed = _distributions("nvidia-pytriton")
    if not installed:
        return "  serve        unavailable: PyTriton not installed (pip install 'scan-deploy[serve]')"
    problem = hosting_problem()
    if problem is not None:
        return f"  serve        {installed[0]} installed, but {problem}"
    return f"  serve        {installed[0]}: Triton's Python backend will load {shared_libpython()}"


def environment_report() -> list[str]:
    lines = [f"python        {platform.python_version()} ({platform.machine()}, {platform.system()})"]
    for name in ("numpy", "PIL", "onnxruntime", "typer"):
        version, reason = _version(name)
        lines.append(f"{name:<13} {version or 'unavailable: ' + str(reason)}")
    for name in ("torch", "open_clip", "onnx", "onnxscript"):
        version, reason = _version(name)
        lines.append(f"{name:<13} {version or 'not installed (optional: pip install scan-deploy[export] for the PyTorch model and export)'}")

    lines.append("backends:")
    torch_version, _ = _version("torch")
    lines.append("  eager        " + ("available (PyTorch)" if torch_version else "unavailable: PyTorch not installed (scan-deploy[export])"))
    version, reason = _version("onnxruntime")
    if version:
        import onnxruntime

        providers = ", ".join(onnxruntime.get_available_providers())
        lines.append(f"  onnxruntime  {version} (compiled-in providers: {providers}; a session reports what really runs)")
        both = _distributions("onnxruntime", "onnxruntime-gpu")
        if len(both) == 2:
            lines.append(f"  onnxruntime  warning: {' and '.join(both)} are both installed and share one module: "
                         "uninstall one (keep onnxruntime-gpu on GPU hosts)")
    else:
        lines.append(f"  onnxruntime  unavailable: {reason} (pip install onnxruntime, or onnxruntime-gpu on GPU hosts)")
    lines.extend(openvino_report())
    lines.extend(tensorrt_report())
    lines.append(serve_report())

    lines.append("devices:")
    lines.extend(cpu_report())
    from runtime.tensorrt import gpu_identity

    gpu, description = gpu_identity()
    lines.append(f"  cuda         {description if gpu else 'none: ' + description}")
    return lines


def openvino_report() -> list[str]:
    version, reason = _version("openvino")
    if not version:
        return [f"  openvino     unavailable: {reason} (pip install openvino)"]
    return [f"  openvino     {version.split('-')[0]} (CPU plugin; compiled models cached in the user cache folder)"]


def cpu_report() -> list[str]:
    """The CPU's vector features and the backend and precision a bundle would run with by default."""
    from runtime.choice import choose
    from runtime.cpu import cpu_info

    cpu = cpu_info()
    features = ", ".join(f"{name} {'yes' if on else 'no'}" for name, on in cpu.features().items())
    backend, precision, notes = choose(None, None, cpu)
    return [f"  cpu          {cpu.model}: {features}",
            f"  default      --backend {backend} --precision {precision} ({'; '.join(notes)})"]


def tensorrt_report() -> list[str]:
    """Which TensorRT flavours import, whether a GPU answers, and so what `--tensorrt` can do here."""
    from runtime.tensorrt import gpu_identity

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


def bundle_report(root: Path, build: bool) -> list[str]:
    """The bundle's manifest, files, recorded parity and engines, and the TensorRT gate run now."""
    from runtime.files import verify_files
    from runtime.manifest import read_manifest
    from runtime.tensorrt import TensorRTUnavailable

    manifest = read_manifest(root)  # BundleError, one line, on a damaged manifest
    lines = [f"bundle {root} (schema {manifest.schema_version}, model {manifest.model.name})"]
    verify_files(root, manifest.files())
    lines.append(f"  files        {len(manifest.files())} files match their sizes and sha256")
    for name, piece in manifest.pieces.items():
        worst = max((v for p in piece.parity for v in p.max_rel.values()), default=0.0)
        extra = "".join(f" + {name}" for name in ("fp16", "int8") if getattr(piece, name) is not None)
        lines.append(f"  {name:<14} {piece.op_count} ops{extra}, ONNX Runtime parity worst {worst:.1e}")
    for variant, checks in manifest.pipeline_check.items():
        worst = min(c.label_agreement for c in checks)
        lines.append(f"  pipeline ({variant}) runtime labels identical to eager on >= {worst:.4%} of pixels")
    for folder, info in manifest.engines.items():
        lines.append(f"  engines/{folder}: {', '.join(info.pieces)} ({info.backend} {info.version})")
    precisions = ["fp32"] + (["fp16"] if all(p.fp16 is not None for p in manifest.pieces.values()) else [])
    lines.append("TensorRT gate (" + ("parse and build" if build else "parse only; --build to build too") + "):")
    from export.engines import gate_bundle

    for precision in precisions:
        try:
            results = gate_bundle(root, precision, build=build)
        except TensorRTUnavailable as exc:
            lines.append(f"  skipped: {exc}")
            break
        lines.extend(f"  [{precision}] {r.summary()}" for r in results)
    return lines

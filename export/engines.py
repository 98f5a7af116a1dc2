"""`scan export --tensorrt`: one engine per piece under `engines/<gpu>-trt<version>-<precision>/`.

Engines are tied to a TensorRT version and a GPU, so each build goes to a folder named after
both and never overwrites another's. Standard TensorRT builds for the GPU it runs on and
needs one; TensorRT-RTX builds ahead of time without a GPU (folder `aot-...`), which is
what the compatibility gate uses on machines like CI. Naming, profiles and the build itself
live in `runtime.tensorrt`, shared with the runtime's lazy builds.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from runtime.errors import ScanError
from runtime.engine_store import input_dims
from runtime.files import sha256_file
from runtime.manifest import EngineFolder, EnginePlan, read_manifest
from runtime.tensorrt import (
    BuildResult, ShapeRanges, build_engine, engine_folder_name, gpu_identity, load_tensorrt, piece_profiles, profile_record,
)

__all__ = ["EngineBuildError", "build_bundle_engines", "engine_folder", "gate_bundle", "gpu_identity", "piece_profiles"]


class EngineBuildError(ScanError):
    """A piece that TensorRT rejected; the message lists the rejected nodes."""


def engine_folder(backend: str | None, precision: str) -> tuple[str, dict]:
    """The folder name for this machine and TensorRT, and what it stands for."""
    trt, name = load_tensorrt((backend,) if backend else ("tensorrt", "tensorrt_rtx"))
    gpu, description = gpu_identity()
    if gpu is None:
        if name == "tensorrt":
            raise EngineBuildError(
                f"TensorRT builds engines for the GPU it runs on, and {description}: run --tensorrt on the "
                "GPU host, or install tensorrt-rtx to build ahead of time without a GPU"
            )
        description = f"ahead-of-time build without a GPU ({description})"
    folder = engine_folder_name(gpu, name, trt.__version__, precision)
    return folder, {"backend": name, "version": trt.__version__, "gpu": description, "precision": precision}


def build_bundle_engines(
    root: Path, onnx_files: dict[str, Path], ranges: ShapeRanges, precision: str, backend: str | None = None,
    report=print,
) -> dict:
    """Build every piece's engine into `root/engines/<folder>/`; the manifest's record of them."""
    folder, info = engine_folder(backend, precision)
    target = root / "engines" / folder
    target.mkdir(parents=True, exist_ok=True)
    cache = target / "timing.cache" if info["backend"] == "tensorrt" else None
    pieces, failures = {}, []
    for piece, path in onnx_files.items():
        result: BuildResult = build_engine(path, piece, ranges, info["backend"], keep_engine=True,
                                           precision=precision, timing_cache=cache)
        report(result.summary())
        if not result.built:
            failures.append(result.summary())
            continue
        plan = target / f"{piece}.plan"
        plan.write_bytes(result.engine)
        pieces[piece] = EnginePlan(plan.relative_to(root).as_posix(), sha256_file(plan), result.engine_bytes,
                                   onnx=path.name, profile=profile_record(result.profile))
    if failures:
        raise EngineBuildError("TensorRT could not build every piece: " + " | ".join(failures))
    ranges_record = {k: list(v) for k, v in asdict(ranges).items()}
    timing = cache.relative_to(root).as_posix() if cache else None
    return {folder: EngineFolder(info["backend"], info["version"], info["gpu"], precision, ranges_record, timing, pieces)}


def gate_bundle(root: Path, precision: str = "fp32", ranges: ShapeRanges | None = None, backend: str | None = None,
                build: bool = True) -> list[BuildResult]:
    """The compatibility gate on an existing bundle: parse (and build) every piece; nothing written."""
    manifest = read_manifest(root)
    if ranges is None:  # the profile of the bundle's own engines, if it has some
        recorded = [e.ranges for e in manifest.engines.values() if e.precision == precision]
        ranges = ShapeRanges.from_dict(recorded[0]) if recorded else ShapeRanges()
    results = []
    for piece, entry in manifest.pieces.items():
        if precision == "fp16" and entry.fp16 is None:
            raise EngineBuildError(f"{root} holds no fp16 pieces: export it with --precision fp16")
        variant = entry.variant(precision)
        results.append(build_engine(root / variant.file, piece, ranges, backend, precision=precision,
                                    parse_only=not build, inputs=input_dims(variant)))
    return results

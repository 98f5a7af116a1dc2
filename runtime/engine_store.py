"""Where a bundle's TensorRT engines come from: the exporter's plans, or plans built here once.

An engine only runs on the GPU and TensorRT version it was built for, so the runtime looks in
exactly one folder, `engines/<gpu>-trt<version>-<precision>/`, and never borrows another's.
Its plans come, in order, from
1. the exporter's record in `manifest.json` (`scan export --tensorrt` on this machine), checked
   against their size and sha256 like every bundle file;
2. a sidecar `built.json` beside plans the runtime built earlier, in the bundle or, when the
   bundle folder is read-only, in the user cache (keyed by the bundle's manifest hash);
3. a build from the bundle's ONNX piece (minutes, once per GPU), recorded in that sidecar.
The runtime never rewrites the exporter's manifest; a sidecar entry built from an ONNX file
whose sha256 is no longer the piece's is stale and rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

from .errors import ScanError
from .files import atomic_write, sha256_file, user_cache_root, verify_files
from .manifest import MANIFEST, EngineFolder, Manifest, PieceFile
from .tensorrt import (
    BACKENDS, ShapeRanges, build_engine, engine_folder_name, load_tensorrt, piece_profiles, profile_record,
)

SIDECAR = "built.json"
SIDECAR_FORMAT = 1


def input_dims(piece: PieceFile) -> dict[str, list]:
    """Input name -> dims (ints fixed, strings symbolic), as the manifest records them."""
    return {spec.name: list(spec.shape) for spec in piece.inputs}


def cache_root(bundle_root: Path) -> Path:
    """The user-cache folder for engines of a bundle that cannot be written to."""
    base = user_cache_root()
    manifest = Path(bundle_root) / MANIFEST
    return base / "engines" / sha256_file(manifest)[:16]


def other_folders(bundle_root: Path, manifest: Manifest, folder: str) -> list[str]:
    """Engine folders of the bundle made for another GPU, TensorRT version or precision."""
    on_disk = {p.name for p in (Path(bundle_root) / "engines").glob("*") if p.is_dir()}
    return sorted((set(manifest.engines) | on_disk) - {folder})


def engine_plans(
    bundle_root: Path, manifest: Manifest, precision: str, gpu: str | None, ranges: ShapeRanges | None = None,
    build_missing: bool = True, report=print, backend: str | None = None,
) -> dict[str, Path]:
    """The plan file of every piece for GPU `gpu` (a `gpu_identity` slug), building missing ones.

    `ranges=None` takes any plan present and builds with the ranges the bundle's engines recorded;
    given ranges also require the plans' profiles to match them.
    """
    bundle_root = Path(bundle_root)
    trt, backend = load_tensorrt((backend,) if backend else BACKENDS)
    folder = engine_folder_name(gpu, backend, trt.__version__, precision)
    sidecar_dirs = [bundle_root / "engines" / folder, cache_root(bundle_root) / folder]
    sources = {name: piece.variant(precision) for name, piece in manifest.pieces.items()}
    wanted = {name: None if ranges is None else profile_record(piece_profiles(name, input_dims(source), ranges))
              for name, source in sources.items()}
    plans, missing = {}, []
    for name, source in sources.items():
        path = _exporter_plan(bundle_root, manifest.engines.get(folder), name, wanted[name])
        for directory in sidecar_dirs:
            path = path or _sidecar_plan(directory, name, source, wanted[name], report)
        if path is None:
            missing.append(name)
        else:
            plans[name] = path
    if not missing:
        return plans
    others = other_folders(bundle_root, manifest, folder)
    elsewhere = (f"{', '.join(f'engines/{o}' for o in others)} {'is' if len(others) == 1 else 'are'} for another GPU, "
                 "TensorRT version or precision and never used here; " if others else "")
    if not build_missing:
        raise ScanError(
            f"no TensorRT engine for {', '.join(missing)} in {bundle_root}: {elsewhere}this machine needs "
            f"engines/{folder}; allow building them (build_missing=True) or run `scan export --tensorrt` on this machine"
        )
    if others:
        report(f"{elsewhere}this machine needs engines/{folder}: building it")
    target = _writable(sidecar_dirs[0])
    if target is None:
        target = sidecar_dirs[1]
        target.mkdir(parents=True, exist_ok=True)
        report(f"{bundle_root} is not writable: building engines into the user cache {target}")
    build_ranges = ranges or _recorded_ranges(manifest, folder, precision)
    from filelock import FileLock

    with FileLock(str(target / ".build.lock")):  # processes starting together build each plan once
        for name in missing:
            plans[name] = _sidecar_plan(target, name, sources[name], wanted[name], lambda line: None) or _build(
                bundle_root, target, name, sources[name], precision, build_ranges, backend, trt.__version__, report)
    return plans


def _exporter_plan(root: Path, folder: EngineFolder | None, piece: str, wanted: dict | None) -> Path | None:
    plan = folder.pieces.get(piece) if folder else None
    if plan is None or not (root / plan.file).is_file():
        return None  # missing: built below, the same as when the exporter never made it
    if wanted is not None and plan.profile != wanted:
        return None  # built for other shape ranges than those asked for
    verify_files(root, [plan])  # the manifest vouches for it: an altered plan is refused, not rebuilt
    return root / plan.file


def _read_sidecar(directory: Path) -> dict:
    try:
        data = json.loads((directory / SIDECAR).read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent or damaged: the runtime's own record, rebuilt as needed
        return {}
    return data if isinstance(data, dict) and data.get("format") == SIDECAR_FORMAT else {}


def _sidecar_plan(directory: Path, piece: str, source: PieceFile, wanted: dict | None, report) -> Path | None:
    entry = _read_sidecar(directory).get("pieces", {}).get(piece)
    if not isinstance(entry, dict):
        return None
    path = directory / str(entry.get("file", ""))
    if entry.get("onnx_sha256") != source.sha256:
        report(f"{directory / piece}: engine was built from another {source.file}; rebuilding (stale)")
        return None
    if wanted is not None and entry.get("profile") != wanted:
        return None
    if not path.is_file() or path.stat().st_size != entry.get("bytes") or sha256_file(path) != entry.get("sha256"):
        report(f"{path}: engine file is missing or damaged; rebuilding")
        return None
    return path


def _writable(directory: Path) -> Path | None:
    """`directory` if plans can be written there (checked by writing: root ignores permission bits)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
        return directory
    except OSError:
        return None


def _recorded_ranges(manifest: Manifest, folder: str, precision: str) -> ShapeRanges:
    """Ranges to build with when none are asked: the exporter's choice for this folder, the same precision, any."""
    candidates = [manifest.engines[folder]] if folder in manifest.engines else []
    candidates += [e for e in manifest.engines.values() if e.precision == precision]
    candidates += list(manifest.engines.values())
    return ShapeRanges.from_dict(candidates[0].ranges) if candidates else ShapeRanges()


def _build(root: Path, target: Path, piece: str, source: PieceFile, precision: str, ranges: ShapeRanges,
           backend: str, version: str, report) -> Path:
    verify_files(root, source.files())  # the sidecar records the ONNX hash: it must be the file built from
    report(f"building TensorRT engine for {piece} (first use on this GPU; minutes)")
    timing = target / "timing.cache" if backend == "tensorrt" else None
    result = build_engine(root / source.file, piece, ranges, backend, keep_engine=True, precision=precision,
                          timing_cache=timing, inputs=input_dims(source))
    report(result.summary())
    if not result.built:
        raise ScanError(f"TensorRT could not build an engine: {result.summary()}; use --backend onnxruntime")
    plan = target / f"{piece}.runtime.plan"  # never the exporter's `<piece>.plan`, which the manifest vouches for
    atomic_write(plan, lambda tmp: tmp.write_bytes(result.engine))
    entry = {
        "file": plan.name, "bytes": result.engine_bytes, "sha256": hashlib.sha256(result.engine).hexdigest(),
        "onnx": source.file, "onnx_sha256": source.sha256, "profile": profile_record(result.profile),
        "ranges": {k: list(v) for k, v in asdict(ranges).items()},
    }
    sidecar = _read_sidecar(target)  # re-read just before writing: another process may have added pieces
    sidecar.update(format=SIDECAR_FORMAT, backend=backend, version=version, precision=precision)
    sidecar.setdefault("pieces", {})[piece] = entry
    text = json.dumps(sidecar, indent=1, sort_keys=True) + "\n"
    atomic_write(target / SIDECAR, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return plan

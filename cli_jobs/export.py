"""`scan export`: a checkpoint or preset into a checked bundle."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from runtime.errors import ScanError
from runtime.vocab import benchmark_vocabularies, parse_vocabulary

from .common import require_torch, say


@dataclass
class ExportOptions:
    out: Path
    checkpoint: Path | None = None
    config: str | None = None
    preset: str | None = None
    vocab: str | None = None
    standard_vocabs: bool = False
    seed: int = 0
    precision: str = "fp32"
    calibration: str | None = None  # int8: images or a dataset (export/calibration.py)
    tensorrt: bool = False
    trt_backend: str | None = None
    trt_ranges: dict[str, str] = field(default_factory=dict)  # "min,opt,max" per dimension


def _parse_range(name: str, text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ScanError(f"--trt-{name} {text!r}: give three integers min,opt,max (e.g. 320,640,1024)")
    return values


def run_export(opts: ExportOptions):
    require_torch("scan export")
    from export.bundle import check_destination, check_precision, engine_precision, sha256_file, write_bundle
    from export.tensorrt import ShapeRanges
    from scan_model.loading import load_model

    if (opts.checkpoint is None) == (opts.preset is None):
        raise ScanError("pass either --checkpoint (with --config for an official SCAN.pth) or --preset")
    check_precision(opts.precision)
    if opts.calibration is not None and "int8" not in check_precision(opts.precision):
        raise ScanError("--calibration is for int8 pieces: add --precision int8 (or drop --calibration)")
    if opts.calibration is not None:
        from export.calibration import calibration_set

        calibration_set(opts.calibration, [], limit=1)  # a bad path fails now, not after minutes of export
    try:
        ranges = ShapeRanges(**{k: _parse_range(k, v) for k, v in opts.trt_ranges.items()})
    except ValueError as exc:
        raise ScanError(str(exc)) from None
    if opts.tensorrt:  # fail before minutes of export when no TensorRT (or no GPU for it) is there
        from export.engines import engine_folder

        engine_folder(opts.trt_backend, engine_precision(opts.precision))
    vocabularies = {}
    if opts.vocab:
        names = parse_vocabulary(opts.vocab)
        key = str(opts.vocab) if str(opts.vocab) in benchmark_vocabularies() else "custom-" + _names_digest(names)
        vocabularies[key] = names
    if opts.standard_vocabs:
        vocabularies.update(benchmark_vocabularies())
    check_destination(opts.out)
    loaded = load_model(opts.checkpoint, opts.config if opts.checkpoint else opts.preset, device="cpu", seed=opts.seed)
    digest = sha256_file(opts.checkpoint) if opts.checkpoint else None
    manifest = write_bundle(loaded.model, opts.out, digest, vocabularies, precision=opts.precision,
                            calibration=opts.calibration, tensorrt=opts.tensorrt, ranges=ranges, trt_backend=opts.trt_backend, report=say)
    for folder in manifest.engines:
        say(f"engines in {opts.out / 'engines' / folder}")
    say(f"bundle written to {opts.out}")
    return manifest


def _names_digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]

"""The checks of `scan bench`: every input it is given, refused with one line before any work.

Backend names, sizes, counts, folders, vocabulary, output paths, the model source and a GPU
backend without a GPU; the result (`Checked`) carries what the checks read (manifest, config).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import parse_size
from runtime.errors import ScanError
from runtime.images import load_image
from runtime.vocab import benchmark_vocabularies, parse_vocabulary

from .common import check_output_dir, require_torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
DEFAULT_SIZE = "640"


@dataclass
class BenchOptions:
    backends: str = "eager,onnxruntime"
    bundle: Path | None = None
    preset: str | None = None
    checkpoint: Path | None = None
    config: str | None = None
    image_size: str | None = None
    images: Path | None = None
    vocab: str = "ade150"
    runs: int = 3
    warmup: int = 1
    threads: int | None = None
    device: str = "cpu"
    seed: int = 0
    json: Path | None = None
    markdown: Path | None = None
    plot: Path | None = None
    sweep_image_size: str | None = None
    sweep_vocab: str | None = None
    sweep_proposals: str | None = None
    sweep_batch: str | None = None


def _counts(text: str, flag: str) -> list[int]:
    try:
        values = [int(v) for v in str(text).split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise ScanError(f"{flag} {text!r}: give comma-separated positive integers (e.g. 1,10,100)")
    return values


def _check_counts(opts: BenchOptions) -> int:
    if opts.runs < 1:
        raise ScanError(f"--runs {opts.runs}: give at least 1 timed round")
    if opts.warmup < 0:
        raise ScanError(f"--warmup {opts.warmup}: give 0 or more warm-up calls")
    threads = opts.threads if opts.threads is not None else (os.cpu_count() or 1)
    if threads < 1:
        raise ScanError(f"--threads {threads}: give at least 1")
    return threads


def _sweeps(opts: BenchOptions, queries: int, max_side: int) -> dict[str, list]:
    sweeps: dict[str, list] = {}
    if opts.sweep_image_size:
        sweeps["image_size"] = [parse_size(v, "--sweep-image-size") for v in opts.sweep_image_size.split(",")]
        _check_side(max(max(s) for s in sweeps["image_size"]), max_side, "--sweep-image-size")
    if opts.sweep_vocab:
        sweeps["vocab"] = _counts(opts.sweep_vocab, "--sweep-vocab")
        if max(sweeps["vocab"]) > len(benchmark_vocabularies()["ade847"]):
            raise ScanError(f"--sweep-vocab {opts.sweep_vocab}: the names come from ade847, so at most 847")
    if opts.sweep_proposals:
        sweeps["proposals"] = _counts(opts.sweep_proposals, "--sweep-proposals")
        if max(sweeps["proposals"]) > queries:
            raise ScanError(f"--sweep-proposals {opts.sweep_proposals}: the model has {queries} proposals, so at most {queries}")
    if opts.sweep_batch:
        sweeps["batch"] = _counts(opts.sweep_batch, "--sweep-batch")
    return sweeps


def _check_side(side: int, max_side: int, flag: str) -> None:
    if side > max_side:
        raise ScanError(f"{flag}: {side} pixels exceeds the model's {max_side} on the long side: give a smaller size")


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ScanError(f"--images {folder}: not a folder; give a folder of images")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ScanError(f"--images {folder}: no image files ({', '.join(IMAGE_SUFFIXES)}) in it")
    return files


def _check_outputs(opts: BenchOptions) -> None:
    for flag, path in (("--json", opts.json), ("--markdown", opts.markdown), ("--plot", opts.plot)):
        if path is None:
            continue
        if path.is_dir():
            raise ScanError(f"{flag} {path} is a folder: give a file path")
        check_output_dir(path.parent)
    if opts.plot is not None:
        from benchmarks.plots import require_matplotlib

        require_matplotlib()


def _check_source(opts: BenchOptions) -> str:
    sources = [flag for flag, value in (("--bundle", opts.bundle), ("--preset", opts.preset)) if value is not None]
    if opts.checkpoint is not None and opts.bundle is None:
        sources.append("--checkpoint")
    if len(sources) != 1:
        raise ScanError("pass one model: --bundle DIR, --preset NAME (random weights) or --checkpoint FILE [--config CFG]")
    if opts.config is not None and opts.checkpoint is None:
        raise ScanError("--config goes with --checkpoint (a preset's config is its own; a bundle's is in its manifest)")
    if opts.checkpoint is not None and not opts.checkpoint.is_file():
        raise ScanError(f"checkpoint not found: {opts.checkpoint}")
    if opts.bundle is not None and not opts.bundle.is_dir():
        raise ScanError(f"bundle folder not found: {opts.bundle}; export one with `scan export` or pass --preset")
    return sources[0].lstrip("-")


def _check_devices(names, device: str) -> None:
    kinds = {n.kind for n in names}
    if "eager" in kinds:
        require_torch("scan bench with the eager backend")
        from scan_model.loading import resolve_device

        resolve_device(device)  # one line when CUDA is asked for and absent
    elif device != "cpu":
        raise ScanError("--device applies to the eager backend; the runtime backends choose theirs (tensorrt: the GPU)")
    if "tensorrt" in kinds:
        from runtime.trt_engine import require_gpu

        require_gpu()


def _model_config(opts: BenchOptions, source: str):
    """(config dict, weights description, checkpoint sha256) of a preset or checkpoint, without building the model."""
    require_torch("scan bench --preset/--checkpoint (it exports the model)")
    from runtime.files import sha256_file
    from scan_model.checkpoint import CheckpointError, read_checkpoint_config
    from scan_model.official_config import load_config

    if source == "preset":
        return json.loads(json.dumps(load_config(opts.preset).to_dict())), f"random weights (seed {opts.seed})", None
    if opts.config is not None:
        cfg = load_config(opts.config)
    elif opts.checkpoint.suffix == ".safetensors":
        cfg = read_checkpoint_config(opts.checkpoint)
    else:
        raise CheckpointError(f"{opts.checkpoint} looks like an official checkpoint: pass --config with its official YAML or a preset")
    digest = sha256_file(opts.checkpoint)
    return json.loads(json.dumps(cfg.to_dict())), f"checkpoint sha256 {digest}", digest


@dataclass
class Checked:
    """Everything `scan bench` was given, checked, before any export or timing."""

    names: list  # benchmarks.backends.BackendName
    threads: int
    source: str  # bundle, preset or checkpoint
    size: tuple[int, int]
    image_files: list[Path]
    images: list  # decoded user images; empty for a generated scene
    vocabulary: list[str]
    config: dict  # the model config, as JSON
    weights: str  # what the weights are, for the report
    digest: str | None  # checkpoint sha256
    manifest: object | None  # the --bundle's manifest
    sweeps: dict[str, list]


def check_options(opts: BenchOptions) -> Checked:
    from benchmarks.backends import parse_backends
    from runtime.manifest import read_manifest

    names = parse_backends(opts.backends)
    threads = _check_counts(opts)
    source = _check_source(opts)
    if opts.images is not None and opts.image_size is not None:
        raise ScanError("--image-size sizes generated scenes; with --images each image keeps its size (official resize)")
    size = parse_size(opts.image_size or DEFAULT_SIZE, "--image-size")
    image_files = _image_files(opts.images) if opts.images is not None else []
    images = [load_image(p) for p in image_files]  # one line naming a file that does not decode
    vocabulary = parse_vocabulary(opts.vocab)
    _check_outputs(opts)
    _check_devices(names, opts.device)
    manifest = None
    if source == "bundle":
        manifest = read_manifest(opts.bundle)
        config, digest = manifest.model.config, manifest.model.checkpoint_sha256
        weights = f"checkpoint sha256 {digest}" if digest else "random weights"
    else:
        config, weights, digest = _model_config(opts, source)
    max_side = config["inference"]["max_size_test"]
    if not images:
        _check_side(max(size), max_side, "--image-size")
    sweeps = _sweeps(opts, config["mask_decoder"]["num_queries"], max_side)
    return Checked(names, threads, source, size, image_files, images, vocabulary, config, weights, digest, manifest,
                   sweeps)

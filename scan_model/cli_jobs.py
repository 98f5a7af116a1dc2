"""What the `scan` commands do, kept out of `cli.py` so the CLI stays a thin layer.

Every job validates all of its inputs (images, vocabulary, checkpoint, output folder)
before it writes anything, so a bad input never leaves partial outputs behind.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from runtime.images import ImageError, load_image
from runtime.outputs import write_outputs
from runtime.vocab import benchmark_vocabularies, parse_vocabulary


@dataclass
class SegmentOptions:
    images: list[Path]
    vocab: str
    out: Path
    checkpoint: Path | None = None
    config: str | None = None
    save_logits: bool = False
    resize: bool = True
    device: str = "auto"
    mask_thr: float | None = None
    ensemble_weight: float | None = None
    replace_ratio: float | None = None
    shift_rule: str | None = None
    log_ensemble: bool | None = None
    benchmark_settings: bool = True
    seed: int = 0


def _say(message: str) -> None:
    print(message, file=sys.stderr)


def check_output_dir(out: Path) -> None:
    """Create `out` if needed and make sure we can write there, before any work starts."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PermissionError(f"cannot create output folder {out}: {exc.strerror}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise PermissionError(f"output folder {out} is not writable")


def check_images(paths: list[Path], out: Path) -> None:
    """Every image decodes, no two share an output name, and no output would overwrite an input."""
    if not paths:
        raise ImageError("no images given")
    stems: dict[str, Path] = {}
    for path in paths:
        load_image(path)  # raises ImageError naming the file
        if path.stem in stems:
            raise ImageError(f"{stems[path.stem]} and {path} would write the same outputs ({path.stem}.png): rename one")
        stems[path.stem] = path
        for suffix in (".png", "_overlay.png", ".npz"):
            target = out / f"{path.stem}{suffix}"
            if target.exists() and target.resolve() == path.resolve():
                raise ImageError(f"output {target} would overwrite the input image {path}: choose another --out")


def run_segment(opts: SegmentOptions) -> list[Path]:
    names = parse_vocabulary(opts.vocab)
    check_images(opts.images, opts.out)
    if opts.checkpoint is None and opts.config is None:
        raise ValueError("pass --checkpoint (with --config for an official SCAN.pth), or --config PRESET for random weights")
    check_output_dir(opts.out)

    from .loading import load_model
    from .presets import apply_benchmark_settings
    from .segmenter import EagerSegmenter

    loaded = load_model(opts.checkpoint, opts.config, device=opts.device, seed=opts.seed)
    if opts.checkpoint is None:
        _say(f"note: no checkpoint given, running {loaded.source}; the segmentation is not meaningful")
    inf = loaded.cfg.inference
    if opts.benchmark_settings and str(opts.vocab) in benchmark_vocabularies():
        if apply_benchmark_settings(loaded.cfg, str(opts.vocab)):
            _say(f"using the official {opts.vocab} settings of {loaded.cfg.name}")
    for field_name, value in (
        ("mask_threshold", opts.mask_thr),
        ("ensemble_weight", opts.ensemble_weight),
        ("replace_ratio", opts.replace_ratio),
        ("shift_rule", opts.shift_rule),
        ("log_ensemble", opts.log_ensemble),
    ):
        if value is not None:
            setattr(inf, field_name, value)
    inf.validate()

    segmenter = EagerSegmenter(loaded.model, resize=opts.resize, seed=opts.seed)
    segmenter.set_vocabulary(names)
    written: list[Path] = []
    for path in tqdm(opts.images, desc="segment", unit="image", disable=len(opts.images) < 2):
        image = load_image(path)
        result = segmenter.segment(image, return_scores=opts.save_logits)
        written += write_outputs(opts.out, path.stem, image, result.label_map, result.classes, result.sem_seg)
        top = ", ".join(result.classes[i] for i in result.present[:5])
        total = sum(result.timings.values())
        _say(f"{path.name}: {result.label_map.shape[1]}x{result.label_map.shape[0]} -> {top} ({total:.2f} s)")
    return written


DEMO_VOCABULARY = ["sky", "grass", "house", "roof", "window", "sun", "ball", "tree"]


def run_demo(out: Path, preset: str, seed: int) -> list[Path]:
    """Draw a scene, segment it with a preset's seeded random weights, write the outputs."""
    from PIL import Image

    from .synthetic import synthetic_scene

    check_output_dir(out / "input")
    image_path = out / "input" / "demo.png"
    image = synthetic_scene(seed=seed)
    from runtime.outputs import atomic_write

    atomic_write(image_path, lambda tmp: Image.fromarray(image).save(tmp, format="PNG"))
    written = run_segment(
        SegmentOptions(images=[image_path], vocab=",".join(DEMO_VOCABULARY), out=out, config=preset, save_logits=True, seed=seed)
    )
    with np.load(written[-1]) as data:
        shape = data["sem_seg"].shape
    _say(f"demo: wrote {', '.join(str(p) for p in [image_path, *written])} (sem_seg {shape})")
    return [image_path, *written]


def run_convert(checkpoint: Path, config: str, out: Path) -> Path:
    from .checkpoint import save_checkpoint
    from .loading import load_model

    if checkpoint.suffix == ".safetensors":
        raise ValueError(f"{checkpoint} is already in our format")
    loaded = load_model(checkpoint, config, device="cpu")
    path = save_checkpoint(loaded.model, loaded.cfg, out)
    report = loaded.report
    ignored = f"; ignored {', '.join(report.ignored)}" if report and report.ignored else ""
    _say(f"converted {checkpoint} -> {path} (+ {path.with_suffix('.json').name}): all keys matched{ignored}")
    return path


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
    tensorrt: bool = False
    trt_backend: str | None = None
    trt_ranges: dict[str, str] = field(default_factory=dict)  # "min,opt,max" per dimension


def _parse_range(name: str, text: str) -> tuple[int, int, int]:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 3:
        raise ValueError(f"--trt-{name} {text!r}: give three integers min,opt,max (e.g. 320,640,1024)")
    return values


def run_export(opts: ExportOptions) -> dict:
    from export.bundle import check_destination, check_precision, sha256_file, write_bundle
    from export.tensorrt import ShapeRanges

    from .loading import load_model

    if (opts.checkpoint is None) == (opts.preset is None):
        raise ValueError("pass either --checkpoint (with --config for an official SCAN.pth) or --preset")
    check_precision(opts.precision)
    ranges = ShapeRanges(**{k: _parse_range(k, v) for k, v in opts.trt_ranges.items()})
    if opts.tensorrt:  # fail before minutes of export when no TensorRT (or no GPU for it) is there
        from export.engines import engine_folder

        engine_folder(opts.trt_backend, opts.precision)
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
                            tensorrt=opts.tensorrt, ranges=ranges, trt_backend=opts.trt_backend, report=_say)
    for folder in manifest["engines"]:
        _say(f"engines in {opts.out / 'engines' / folder}")
    _say(f"bundle written to {opts.out}")
    return manifest


def _names_digest(names: list[str]) -> str:
    import hashlib

    return hashlib.sha256("\n".join(names).encode()).hexdigest()[:12]

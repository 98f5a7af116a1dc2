"""`scan segment`: the eager model (--checkpoint/--config) or a bundle (--bundle), same outputs.

Every input (images, vocabulary, model or bundle, output folder) is checked before anything
is written, so a bad input never leaves partial outputs behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from runtime.images import load_image
from runtime.outputs import write_outputs
from runtime.vocab import benchmark_vocabularies, parse_vocabulary

from .common import check_images, check_output_dir, say
from .segmenters import open_segmenter


@dataclass
class SegmentOptions:
    images: list[Path]
    vocab: str
    out: Path
    checkpoint: Path | None = None
    config: str | None = None
    bundle: Path | None = None
    server: str | None = None  # a `scan serve` server: host:port (HTTP) or grpc://host:port
    backend: str | None = None  # None: runtime.choice picks
    precision: str | None = None
    threads: int | None = None
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


def _segmenter(opts: SegmentOptions):
    return open_segmenter(opts.bundle, opts.checkpoint, opts.config, opts.backend, opts.precision, opts.threads,
                          opts.resize, opts.device, opts.seed, "scan segment")


def run_segment(opts: SegmentOptions) -> list[Path]:
    names = parse_vocabulary(opts.vocab)
    check_images(opts.images, opts.out)
    if opts.server is not None:
        return _run_served(opts, names)
    segmenter, model_name, note = _segmenter(opts)
    check_output_dir(opts.out)
    if note:
        say(note)
    settings = segmenter.settings
    preset = str(opts.vocab)
    if opts.benchmark_settings and preset in benchmark_vocabularies():
        official = segmenter.settings_for(preset)
        if official != settings:
            say(f"using the official {preset} settings of {model_name}")
        settings = official
    settings = settings.replace(
        mask_threshold=opts.mask_thr, ensemble_weight=opts.ensemble_weight, replace_ratio=opts.replace_ratio,
        shift_rule=opts.shift_rule, log_ensemble=opts.log_ensemble,
    )
    segmenter.set_vocabulary(names)
    written: list[Path] = []
    for path in tqdm(opts.images, desc="segment", unit="image", disable=len(opts.images) < 2):
        image = load_image(path)
        result = segmenter.segment(image, return_scores=opts.save_logits, settings=settings)
        written += write_outputs(opts.out, path.stem, image, result.label_map, result.classes, result.sem_seg)
        top = ", ".join(result.classes[i] for i in result.present[:5])
        stages = ", ".join(f"{k} {v:.2f}" for k, v in result.timings.items())
        say(f"{path.name}: {result.label_map.shape[1]}x{result.label_map.shape[0]} -> {top} "
            f"({sum(result.timings.values()):.2f} s: {stages})")
    return written


def _run_served(opts: SegmentOptions, names: list[str]) -> list[Path]:
    """The same outputs from a `scan serve` server (label maps; the server keeps its scores)."""
    from runtime.client import ServedSegmenter
    from runtime.errors import ScanError

    if opts.save_logits or any(v is not None for v in (opts.checkpoint, opts.bundle, opts.mask_thr, opts.ensemble_weight,
                                                         opts.replace_ratio, opts.shift_rule, opts.log_ensemble)):
        raise ScanError("--server sends images to a served bundle, whose settings apply: drop --save-logits, "
                        "--checkpoint/--bundle and the setting overrides")
    segmenter = ServedSegmenter(opts.server)
    check_output_dir(opts.out)
    segmenter.set_vocabulary(names)
    written: list[Path] = []
    for path in tqdm(opts.images, desc="segment", unit="image", disable=len(opts.images) < 2):
        image = load_image(path)
        result = segmenter.segment(image)
        written += write_outputs(opts.out, path.stem, image, result.label_map, result.classes, None)
        say(f"{path.name}: {', '.join(result.classes[i] for i in result.present[:5])} "
            f"({result.timings['server']:.2f} s at {opts.server})")
    return written

"""`scan segment`: the eager model (--checkpoint/--config) or a bundle (--bundle), same outputs.

Every input (images, vocabulary, model or bundle, output folder) is checked before anything
is written, so a bad input never leaves partial outputs behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from runtime.errors import ScanError
from runtime.images import load_image
from runtime.outputs import write_outputs
from runtime.vocab import benchmark_vocabularies, parse_vocabulary

from .common import check_images, check_output_dir, require_torch, say


@dataclass
class SegmentOptions:
    images: list[Path]
    vocab: str
    out: Path
    checkpoint: Path | None = None
    config: str | None = None
    bundle: Path | None = None
    backend: str = "onnxruntime"
    precision: str = "fp32"
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
    """The runtime's `Segmenter` for --bundle, else the eager model's; the model's name; a note for the user."""
    if opts.bundle is not None:
        if opts.checkpoint is not None or opts.config is not None:
            raise ScanError("pass either --bundle, or --checkpoint/--config for the PyTorch model, not both")
        if opts.device not in ("auto", "cpu"):
            raise ScanError("--device applies to the PyTorch model; with --bundle choose --backend (and ONNX Runtime providers)")
        from runtime.segmenter import Segmenter

        segmenter = Segmenter(opts.bundle, backend=opts.backend, precision=opts.precision, threads=opts.threads,
                              resize=opts.resize, report=say)
        return segmenter, segmenter.manifest.model.name, None
    if opts.backend != "onnxruntime" or opts.precision != "fp32":
        raise ScanError("--backend and --precision apply to --bundle; the PyTorch model runs with --device")
    if opts.checkpoint is None and opts.config is None:
        raise ScanError("pass --bundle, or --checkpoint (with --config for an official SCAN.pth), or --config PRESET for random weights")
    require_torch("scan segment --checkpoint/--config")
    from scan_model.loading import load_model
    from scan_model.segmenter import EagerSegmenter

    loaded = load_model(opts.checkpoint, opts.config, device=opts.device, seed=opts.seed)
    note = None
    if opts.checkpoint is None:
        note = f"note: no checkpoint given, running {loaded.source}; the segmentation is not meaningful"
    return EagerSegmenter(loaded.model, resize=opts.resize, seed=opts.seed), loaded.cfg.name, note


def run_segment(opts: SegmentOptions) -> list[Path]:
    names = parse_vocabulary(opts.vocab)
    check_images(opts.images, opts.out)
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

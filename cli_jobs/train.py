"""`scan train` and `scan data synth`: the command-line side of training."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .common import require_torch, say


@dataclass
class TrainOptions:
    config: str
    dataset: str
    out: Path
    data_root: str | None = None
    split: str = "train"
    init: Path | None = None
    clip_weights: Path | None = None
    backbone_weights: Path | None = None
    max_iter: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    checkpoint_period: int | None = None
    num_workers: int | None = None
    seed: int | None = None
    settings: list[str] = field(default_factory=list)  # --set KEY=VALUE
    resume: bool = False
    device: str = "auto"
    progress: bool | None = None


def overrides(opts: TrainOptions) -> list[tuple[str, str]]:
    """The named flags as dotted overrides, then every --set in order (a later one wins)."""
    from scan_model.training.config import parse_overrides

    named = {
        "solver.max_iter": opts.max_iter, "solver.ims_per_batch": opts.batch_size, "solver.base_lr": opts.lr,
        "checkpoint_period": opts.checkpoint_period, "num_workers": opts.num_workers, "seed": opts.seed,
    }
    pairs = [(key, str(value)) for key, value in named.items() if value is not None]
    return pairs + parse_overrides(opts.settings)


def run_train(opts: TrainOptions) -> Path:
    require_torch("scan train")
    from scan_model.distributed import shutdown
    from scan_model.training.trainer import TrainRequest, train

    request = TrainRequest(
        config=opts.config, dataset=opts.dataset, out=opts.out, data_root=opts.data_root, split=opts.split,
        init=opts.init, clip_weights=opts.clip_weights, backbone_weights=opts.backbone_weights, overrides=overrides(opts), resume=opts.resume,
        device=opts.device, progress=opts.progress,
    )
    try:
        final = train(request)
    finally:
        shutdown()
    say(f"train: wrote {final} (+ {final.with_suffix('.json').name}); log in {opts.out / 'log.jsonl'}")
    return final


def run_synth(out: Path, images: int, size: str, seed: int) -> dict:
    from runtime.datasets import DatasetError
    from runtime.synthetic_data import write_synthetic_dataset

    height, sep, width = size.lower().partition("x")
    try:
        shape = (int(height), int(width)) if sep else (int(height), int(height))
    except ValueError:
        raise DatasetError(f"bad --size {size!r}: write HxW (e.g. 256x256) or one number") from None
    summary = write_synthetic_dataset(out, images=images, size=shape, seed=seed)
    counts = ", ".join(f"{split} {n}" for split, n in summary["images"].items())
    say(f"data synth: wrote {out} (images: {counts}; {len(summary['classes'])} classes); use it with --dataset {out}")
    return summary

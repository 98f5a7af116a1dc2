"""`scan finetune-clip`: the command-line side of the CLIP finetuning."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .common import require_torch, say


@dataclass
class FinetuneOptions:
    config: str
    dataset: str
    out: Path
    data_root: str | None = None
    split: str = "train"
    csv: Path | None = None
    full_images: Path | None = None
    val_dataset: str | None = None
    init: Path | None = None
    clip_weights: Path | None = None
    max_steps: int | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None
    settings: list[str] = field(default_factory=list)
    resume: bool = False
    device: str = "auto"
    progress: bool | None = None


def overrides(opts: FinetuneOptions) -> list[tuple[str, str]]:
    from scan_model.training.config import parse_overrides

    named = {"solver.max_steps": opts.max_steps, "solver.epochs": opts.epochs,
             "solver.batch_size": opts.batch_size, "solver.lr": opts.lr, "seed": opts.seed}
    return [(k, str(v)) for k, v in named.items() if v is not None] + parse_overrides(opts.settings)


def run_finetune(opts: FinetuneOptions) -> Path:
    require_torch("scan finetune-clip")
    from scan_model.distributed import shutdown
    from scan_model.finetune.trainer import FinetuneRequest, finetune

    request = FinetuneRequest(
        config=opts.config, dataset=opts.dataset, out=opts.out, data_root=opts.data_root, split=opts.split,
        csv=opts.csv, full_images=opts.full_images, val_dataset=opts.val_dataset, init=opts.init,
        clip_weights=opts.clip_weights, overrides=overrides(opts), resume=opts.resume, device=opts.device,
        progress=opts.progress,
    )
    try:
        final = finetune(request)
    finally:
        shutdown()
    say(f"finetune-clip: wrote {final}; put it into a segmentation checkpoint with "
        f"`scan fuse --checkpoint SEG --clip {final} --out FUSED.safetensors`; log in {opts.out / 'log.jsonl'}")
    return final

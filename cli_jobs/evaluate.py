"""`scan eval`: mIoU, fwIoU, mACC, pACC and SG-IoU of a checkpoint (eager) or a bundle (runtime).

Under torchrun every process segments its share of the images and the confusion matrices
are summed across ranks before the metrics are computed, so the numbers do not depend on
the number of processes.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from runtime.datasets import open_dataset
from runtime.evaluation import evaluate, report, summary_lines
from runtime.files import atomic_write

from .common import require_torch, say
from .segmenters import open_segmenter


@dataclass
class EvalOptions:
    dataset: str
    checkpoint: Path | None = None
    config: str | None = None
    bundle: Path | None = None
    backend: str | None = None  # None: runtime.choice picks
    precision: str | None = None
    threads: int | None = None
    data_root: str | None = None
    split: str = "val"
    json: Path | None = None
    resize: bool = True
    device: str = "auto"
    mask_thr: float | None = None
    ensemble_weight: float | None = None
    replace_ratio: float | None = None
    log_ensemble: bool | None = None
    benchmark_settings: bool = True
    seed: int = 0
    progress: bool | None = None


def _segmenter(opts: EvalOptions):
    segmenter, _, note = open_segmenter(opts.bundle, opts.checkpoint, opts.config, opts.backend, opts.precision,
                                        opts.threads, opts.resize, _device(opts.device), opts.seed, "scan eval")
    if note:
        say(note)
    return segmenter


def _device(device: str) -> str:
    if device == "auto" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch

        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}" if torch.cuda.is_available() else "cpu"
    return device


def run_eval(opts: EvalOptions) -> dict:
    dataset = open_dataset(opts.dataset, opts.data_root, split=opts.split if _is_generic(opts.dataset) else None)
    ctx = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        require_torch("scan eval under torchrun")
        from scan_model.distributed import init_distributed

        ctx = init_distributed("cpu" if opts.bundle is not None else opts.device)
    rank, world = (ctx.rank, ctx.world_size) if ctx else (0, 1)
    try:
        segmenter = _segmenter(opts)
        settings = segmenter.settings
        if opts.benchmark_settings and dataset.benchmark:
            settings = segmenter.settings_for(dataset.benchmark)
        settings = settings.replace(mask_threshold=opts.mask_thr, ensemble_weight=opts.ensemble_weight,
                                    replace_ratio=opts.replace_ratio, log_ensemble=opts.log_ensemble)
        progress = rank == 0 and (opts.progress if opts.progress is not None else os.isatty(2))
        run = evaluate(segmenter, dataset, settings, rank, world, progress=progress)
        if ctx is not None:
            run.matrix.matrix = _sum_over_ranks(run.matrix.matrix, ctx)
    finally:
        if ctx is not None:
            from scan_model.distributed import shutdown

            shutdown()
    result = report(run.matrix, dataset, settings)
    result.update(model=str(opts.bundle or opts.checkpoint or opts.config),
                  backend=f"{segmenter.backend}-{segmenter.precision}" if opts.bundle else "eager", processes=world,
                  seconds_per_image=round(run.seconds / max(run.images, 1), 4))
    if rank == 0:
        for line in summary_lines(result):
            print(line)
        if opts.json is not None:
            atomic_write(opts.json, lambda tmp: tmp.write_text(json.dumps(result, indent=1) + "\n"))
            say(f"eval: wrote {opts.json}")
    return result


def _is_generic(spec: str) -> bool:
    return Path(spec).is_dir()


def _sum_over_ranks(matrix, ctx):
    import torch

    from scan_model.distributed import all_reduce_sum

    device = ctx.device if ctx.device.type == "cuda" else torch.device("cpu")
    total = all_reduce_sum(torch.from_numpy(matrix.copy()).to(device))
    return total.cpu().numpy()

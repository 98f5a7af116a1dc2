"""`scan finetune-clip`: the contextual-shifted CLIP finetuning loop (SPEC §4), one process or torchrun.

`prepare` checks everything a user can get wrong (settings, data, output folder, resume
state) before any model is built. `finetune` then trains the region tower against the locked
text tower with the symmetric InfoNCE over all ranks, writes checkpoints that resume exactly,
logs JSON lines, and runs the zero-shot check on validation regions after each epoch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from runtime.datasets import DatasetError, SegmentationDataset, open_dataset
from runtime.errors import ScanError
from runtime.files import atomic_write, user_cache_root

from .. import distributed as dist
from ..loading import load_model
from ..official_config import load_config
from ..training import state as ckpt
from ..training.config import TrainConfigError, resumed_config
from ..training.data import IterationBatches
from ..training.loop import Progress, parameter_digest, restore_state, save_training_state, truncate_log
from .config import FinetuneConfig, finetune_recipe, set_value
from .data import RegionPairs, collate
from .model import ContextualShiftClip
from .objective import clamp_logit_scale, distributed_contrastive_loss
from .region_data import RegionRecord, dataset_regions, read_ovseg_csv
from .solver import build_optimizer, build_scheduler
from .zeroshot import class_features, zeroshot_accuracy

LOG = "log.jsonl"
FINAL = "clip_final.safetensors"
RUN_CONFIG = "finetune_config.json"
CLIP_FORMAT = "scan-deploy-clip"
# Settings that may change when a run is resumed without changing what the steps compute.
RESUMABLE_CHANGES = ("checkpoint_period", "keep_checkpoints", "log_period", "num_workers", "zeroshot_every",
                     "zeroshot_max_regions", "solver.max_steps", "solver.epochs")


@dataclass
class FinetuneRequest:
    config: str  # preset name, official YAML or our JSON: which CLIP, which recipe
    dataset: str  # segmentation dataset: training regions (unless csv) and the validation split
    out: Path
    data_root: str | None = None
    split: str = "train"
    csv: Path | None = None  # ov-seg mask-caption CSV: training regions from it instead
    full_images: Path | None = None  # folder of the CSV's full images (COCO train2017)
    val_dataset: str | None = None  # default: the validation split of `dataset`
    init: Path | None = None  # a SCAN checkpoint whose CLIP towers start the run
    clip_weights: Path | None = None  # or local open_clip weights (datacomp)
    overrides: list[tuple[str, str]] = field(default_factory=list)
    resume: bool = False
    device: str = "auto"
    progress: bool | None = None


@dataclass
class FinetunePlan:
    cfg: FinetuneConfig
    records: list[RegionRecord]
    source: str
    val: SegmentationDataset | None
    val_records: list[RegionRecord]
    steps_per_epoch: int
    total_steps: int
    start: ckpt.TrainingState | None
    start_weights: dict | None


def prepare(request: FinetuneRequest) -> FinetunePlan:
    """Validate the request; read the region lists and the resume point. Builds no model."""
    model_cfg = load_config(request.config)
    cfg = finetune_recipe(model_cfg.name)
    for key, value in request.overrides:
        set_value(cfg, key, value)
    cfg.validate(model_cfg.clip.layers)
    for flag, path in (("--init", request.init), ("--clip-weights", request.clip_weights)):
        if path is not None and not Path(path).is_file():
            raise ScanError(f"{flag} {path}: file not found (nothing is downloaded; pass a local file)")
    if request.init is not None and request.clip_weights is not None:
        raise ScanError("pass --init (a SCAN checkpoint) or --clip-weights (open_clip weights), not both")
    out = Path(request.out)
    weights, start = ckpt.resume_point(out, request.resume, LOG, "finetuning run")
    if start is not None:
        cfg = resumed_config(FinetuneConfig, start.train_config, request.overrides, RESUMABLE_CHANGES)

    cache = user_cache_root() / "regions"
    if request.csv is not None:
        if request.full_images is None:
            raise ScanError("--csv needs --full-images: the folder of the full images its regions were cut from "
                            "(COCO train2017 for ov-seg's files)")
        records, source = read_ovseg_csv(Path(request.csv), Path(request.full_images)), str(request.csv)
    else:
        train = open_dataset(request.dataset, request.data_root, split=request.split)
        records, source = dataset_regions(train, cfg.min_region_pixels, cache), train.name
    val = _validation_dataset(request) if cfg.zeroshot_every else None
    val_records = dataset_regions(val, cfg.min_region_pixels, cache)[:cfg.zeroshot_max_regions] if val else []

    batch, world = cfg.solver.batch_size, int(os.environ.get("WORLD_SIZE", "1"))
    if batch % world:
        raise TrainConfigError(f"batch size {batch} does not split evenly over {world} processes: "
                               "pass --batch-size as a multiple of the process count")
    if len(records) < batch:
        raise TrainConfigError(f"{source} gives {len(records)} regions, fewer than one batch of {batch}: "
                               "lower --batch-size or add data")
    steps_per_epoch = len(records) // batch  # the last partial batch of an epoch is dropped
    total = cfg.solver.max_steps or cfg.solver.epochs * steps_per_epoch
    if start is not None:
        if start.dataset.get("regions") != len(records) or start.dataset.get("source") != source:
            raise ckpt.ResumeError(f"the run in {out} trained on {start.dataset.get('source')} "
                                   f"({start.dataset.get('regions')} regions); pass the same data to resume")
        if start.iteration >= total:
            raise ckpt.ResumeError(f"the run in {out} already completed {start.iteration} steps of {total}: "
                                   "raise --max-steps or --epochs to train further")
    return FinetunePlan(cfg, records, source, val, val_records, steps_per_epoch, total, start, weights)


def _validation_dataset(request: FinetuneRequest) -> SegmentationDataset | None:
    """--val-dataset, else the `val` split of a generic dataset or the `_val` twin of a benchmark."""
    if request.val_dataset is not None:
        return open_dataset(request.val_dataset, request.data_root, split="val")
    name = str(request.dataset)
    guess = name[: -len("_train")] + "_val" if name.endswith("_train") else name
    try:
        return open_dataset(guess, request.data_root, split="val")
    except DatasetError as exc:
        print(f"warning: no validation split found ({exc}); the zero-shot check is off: pass --val-dataset",
              file=sys.stderr)
        return None


def build_model(request: FinetuneRequest, cfg: FinetuneConfig) -> ContextualShiftClip:
    """The two towers from --init, from --clip-weights (both towers), or seeded random ones."""
    loaded = load_model(request.init, None if _is_ours(request.init) else request.config, device="cpu",
                        seed=cfg.seed if request.init is None else 0, clip_weights=request.clip_weights)
    model = ContextualShiftClip.from_scan_model(loaded.model, cfg.shift, cfg.activation)
    if cfg.lock_text:
        model.lock_text()
    return model


def _is_ours(path: Path | None) -> bool:
    return path is not None and Path(path).suffix == ".safetensors"


def save_clip(model: ContextualShiftClip, path: Path, info: dict) -> Path:
    """Our CLIP file: safetensors with `clip_model.*` / `original_clip_visual.*` keys (what `scan fuse` takes)."""
    from safetensors.torch import save_file

    metadata = {"format": CLIP_FORMAT, "clip_config": json.dumps(dataclasses.asdict(model.clip_cfg)),
                "info": json.dumps(info)}
    atomic_write(Path(path), lambda tmp: save_file(model.clip_state_dict(), str(tmp), metadata=metadata))
    return Path(path)


def finetune(request: FinetuneRequest, plan: FinetunePlan | None = None) -> Path:
    """Run (or resume) the finetuning; returns the final CLIP file (on every rank)."""
    ctx = dist.init_distributed(request.device)
    plan = plan or prepare(request)
    dist.barrier()
    cfg, out = plan.cfg, Path(request.out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / RUN_CONFIG, lambda p: p.write_text(json.dumps(cfg.to_dict(), indent=1) + "\n"))
    model = build_model(request, cfg)
    if plan.start_weights is not None:
        model.load_state_dict(plan.start_weights, strict=True)
    model = model.to(ctx.device).train()
    wrapped = model
    if ctx.distributed:
        wrapped = nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    optimizer = build_optimizer(model, cfg.solver)
    scheduler = build_scheduler(optimizer, plan.total_steps, cfg.solver.warmup_steps)
    start_step = 0
    if plan.start is not None:
        start_step = restore_state(plan.start, optimizer, scheduler, ctx)
    truncate_log(out / LOG, start_step, ctx, key="step")
    log = _Log(out / LOG, ctx.is_main)
    zeroshot = _ZeroShot(plan, ctx, log)
    if start_step == 0:
        zeroshot.run(model, step=0, epoch=0)  # the starting tower's accuracy, for comparison
    pairs = RegionPairs(plan.records, cfg.seed, model.clip_cfg.num_patches, len(cfg.shift.replace_layers),
                        cfg.text_mode)
    batches = IterationBatches(len(pairs), cfg.solver.batch_size, ctx.rank, ctx.world_size, cfg.seed,
                               start_step, plan.total_steps)
    loader = torch.utils.data.DataLoader(pairs, batch_sampler=batches, num_workers=cfg.num_workers,
                                         collate_fn=collate, generator=torch.Generator().manual_seed(0))
    use_amp = cfg.solver.amp and ctx.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    progress = Progress(ctx.is_main, start_step, plan.total_steps, request.progress, desc="finetune-clip")
    logit_scale = model.clip_model.logit_scale
    last_saved, tick = start_step, time.perf_counter()
    for step, batch in enumerate(loader, start=start_step):
        data_time = time.perf_counter() - tick
        batch = {k: v.to(ctx.device, non_blocking=True) for k, v in batch.items()}
        with torch.autocast(ctx.device.type, dtype=torch.float16, enabled=use_amp):
            image_features, text_features = wrapped(batch["region"], batch["mask"], batch["image"],
                                                    batch["tokens"], batch["shift_keys"])
        image_features, text_features = image_features.float(), text_features.float()
        if ctx.distributed:
            # Each rank's loss covers the global batch, but gradients reach only its own features;
            # DDP averages over ranks, so scale the feature gradients by the world size to get the
            # gradient of one process holding the whole batch (the logit scale's is already whole).
            for features in (image_features, text_features):
                if features.requires_grad:
                    features.register_hook(lambda grad: grad * ctx.world_size)
        loss = distributed_contrastive_loss(image_features, text_features, logit_scale)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"loss is {float(loss)} at step {step}: lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        lr = optimizer.param_groups[0]["lr"]
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        clamp_logit_scale(logit_scale)
        done = step + 1
        if done % cfg.log_period == 0 or done == plan.total_steps or done == start_step + 1:
            log.write({"step": done, "epoch": round(done / plan.steps_per_epoch, 3), "lr": lr, "loss": float(loss.detach()),
                       "logit_scale": round(float(logit_scale.detach().exp()), 4),
                       "time": round(time.perf_counter() - tick, 4), "data_time": round(data_time, 4),
                       "eta_s": round(progress.eta(), 1)})
        progress.update(float(loss.detach()), lr)
        if done % plan.steps_per_epoch == 0 or done == plan.total_steps:
            epoch = -(-done // plan.steps_per_epoch)
            if cfg.zeroshot_every and (epoch % cfg.zeroshot_every == 0 or done == plan.total_steps):
                zeroshot.run(model, step=done, epoch=epoch)
        if done % cfg.checkpoint_period == 0 and done < plan.total_steps:
            _save(out, model, cfg, plan, optimizer, scheduler, done, ctx)
            last_saved = done
        tick = time.perf_counter()
    progress.close()
    if last_saved != plan.total_steps:
        _save(out, model, cfg, plan, optimizer, scheduler, plan.total_steps, ctx)
    digests = dist.all_gather_objects(parameter_digest(model))
    if ctx.is_main:
        save_clip(model, out / FINAL, {"steps": plan.total_steps, "source": plan.source,
                                       "activation": cfg.activation, "zeroshot": zeroshot.history})
        log.write({"step": plan.total_steps, "final": str(out / FINAL), "world_size": ctx.world_size,
                   "parameter_sha256_by_rank": digests})
    dist.barrier()
    return out / FINAL


class _Log:
    def __init__(self, path: Path, main: bool):
        self.path, self.main = path, main

    def write(self, record: dict) -> None:
        if self.main:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")


class _ZeroShot:
    """The zero-shot check on validation regions; its results go to the log and the final file."""

    def __init__(self, plan: FinetunePlan, ctx: dist.DistContext, log: _Log):
        self.plan, self.ctx, self.log, self.history = plan, ctx, log, []
        self.classifier = None  # the class names' text features: constant while the text tower is locked

    def run(self, model: ContextualShiftClip, step: int, epoch: int) -> None:
        if self.plan.val is None or not self.plan.val_records:
            return
        classifier = self.classifier
        if classifier is None:
            classifier = class_features(model, self.plan.val.class_names, self.ctx.device)
            if self.plan.cfg.lock_text:
                self.classifier = classifier
        result = zeroshot_accuracy(model, self.plan.val_records, self.plan.val.class_names, classifier,
                                   self.ctx.device, self.ctx.rank, self.ctx.world_size)
        entry = {"step": step, "epoch": epoch, "dataset": self.plan.val.name, **result}
        self.history.append({k: v for k, v in entry.items() if k != "per_class"})
        self.log.write({"step": step, "zeroshot": entry})
        if self.ctx.is_main:
            print(f"zero-shot after epoch {epoch} (step {step}): top-1 {100 * result['top1']:.2f}%, "
                  f"mean class accuracy {100 * result['mean_class_acc']:.2f}% on {result['regions']} regions "
                  f"of {self.plan.val.name}", file=sys.stderr)


def _save(out, model, cfg, plan, optimizer, scheduler, step, ctx) -> None:
    save_training_state(out, lambda path: save_clip(model, path, {"step": step}), ctx, step, optimizer, scheduler,
                        cfg.to_dict(), {"source": plan.source, "regions": len(plan.records)}, cfg.keep_checkpoints)

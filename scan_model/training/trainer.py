"""The training loop of the segmentation model (SPEC §3): one process or several under torchrun.

`prepare` checks everything a user can get wrong (config keys, dataset, output folder,
resume state) before any model is built; `train` then runs the loop: DistributedDataParallel
when launched by torchrun, mixed precision on CUDA, checkpoints every `checkpoint_period`
iterations and at the end, a JSON-lines log and a progress bar on rank 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from runtime.datasets import SegmentationDataset, open_dataset
from runtime.errors import ScanError
from runtime.files import atomic_write

from .. import distributed as dist
from ..checkpoint import load_state_dict_checked, save_checkpoint
from ..loading import load_model
from ..model import ScanModel
from ..official_config import load_config, read_yaml
from . import state as ckpt
from .config import TrainConfig, TrainConfigError, recipe, recipe_from_official, resumed_config, set_value
from .criterion import CriterionConfig, SetCriterion
from .data import AugmentedSamples, IterationBatches, batch_loader
from .loop import Progress, parameter_digest, restore_state, save_training_state, truncate_log
from .solver import build_optimizer, build_scheduler, clip_gradients

LOG = "log.jsonl"
FINAL = "model_final.safetensors"
RUN_CONFIG = "train_config.json"
# Settings that may change when a run is resumed: they do not alter the trajectory.
RESUMABLE_CHANGES = ("solver.max_iter", "checkpoint_period", "keep_checkpoints", "log_period", "num_workers")
# Labels of at most this many images are all read before training; beyond, a sample of them.
FULL_LABEL_CHECK = 2000


@dataclass
class TrainRequest:
    config: str  # preset name, official YAML or our JSON
    dataset: str
    out: Path
    data_root: str | None = None
    split: str = "train"
    init: Path | None = None  # our .safetensors or an official .pth to start from
    clip_weights: Path | None = None  # local open_clip weights for both CLIP towers
    backbone_weights: Path | None = None  # local ImageNet Swin .pth for the backbone
    overrides: list[tuple[str, str]] = field(default_factory=list)
    resume: bool = False
    device: str = "auto"
    progress: bool | None = None  # None: when stderr is a terminal


@dataclass
class Plan:
    train_cfg: TrainConfig
    dataset: SegmentationDataset
    start: ckpt.TrainingState | None
    start_weights: dict | None


def prepare(request: TrainRequest) -> Plan:
    """Validate the request and resolve the configs, dataset and resume point; builds no model."""
    train_cfg = recipe(load_config(request.config).name)
    if str(request.config).endswith((".yaml", ".yml")):
        train_cfg = recipe_from_official(train_cfg, read_yaml(request.config))
    for key, value in request.overrides:
        set_value(train_cfg, key, value)
    train_cfg.validate()
    for flag, path in (("--init", request.init), ("--clip-weights", request.clip_weights),
                       ("--backbone-weights", request.backbone_weights)):
        if path is not None and not Path(path).is_file():
            raise ScanError(f"{flag} {path}: file not found (nothing is downloaded; pass a local file)")
    dataset = open_dataset(request.dataset, request.data_root, split=request.split)
    dataset.check_labels(None if len(dataset) <= FULL_LABEL_CHECK else FULL_LABEL_CHECK)
    out = Path(request.out)
    weights, start = ckpt.resume_point(out, request.resume, LOG, "training run")
    if start is not None:
        train_cfg = resumed_config(TrainConfig, start.train_config, request.overrides, RESUMABLE_CHANGES)
        if start.dataset.get("items") != len(dataset) or start.dataset.get("classes") != dataset.class_names:
            raise ckpt.ResumeError(f"the run in {out} trained on {start.dataset.get('name')} "
                                   f"({start.dataset.get('items')} images); pass the same --dataset to resume")
        if start.iteration >= train_cfg.solver.max_iter:
            raise ckpt.ResumeError(f"the run in {out} already completed {start.iteration} iterations "
                                   f"(max_iter {train_cfg.solver.max_iter}); raise --max-iter to train further")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if train_cfg.solver.ims_per_batch % world:
        raise TrainConfigError(f"batch size {train_cfg.solver.ims_per_batch} does not split evenly over {world} "
                               "processes: pass --batch-size as a multiple of the process count")
    return Plan(train_cfg, dataset, start, weights)


class TrainingForward(nn.Module):
    """What DistributedDataParallel wraps: images -> every prediction set with class logits."""

    def __init__(self, model: ScanModel, class_embeddings: torch.Tensor):
        super().__init__()
        self.model = model
        self.register_buffer("class_embeddings", class_embeddings, persistent=False)

    def forward(self, images: torch.Tensor) -> list[dict]:
        classifier = self.model.text_classifier(self.class_embeddings)
        return [{"class_logits": p.query_embeddings, "mask_logits": p.mask_logits}
                for p in self.model.predict_for_training(images, classifier)]


def freeze_clip(model: ScanModel) -> None:
    """Both CLIP towers are frozen (SPEC §3.4); everything else trains."""
    for tower in (model.clip, model.original_clip):
        tower.requires_grad_(False)
        tower.eval()


def train(request: TrainRequest, plan: Plan | None = None) -> Path:
    """Run (or resume) training; returns the final checkpoint path (on every rank)."""
    ctx = dist.init_distributed(request.device)
    plan = plan or prepare(request)
    dist.barrier()  # every rank has checked the output folder before rank 0 writes to it
    tcfg, dataset = plan.train_cfg, plan.dataset
    out = Path(request.out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / RUN_CONFIG, lambda p: p.write_text(json.dumps(tcfg.to_dict(), indent=1) + "\n"))
    model = load_model(request.init, request.config, device="cpu", seed=tcfg.seed,
                       clip_weights=request.clip_weights, backbone_weights=request.backbone_weights).model
    cfg = model.cfg
    if tcfg.ensemble_weight is not None:
        cfg.inference.ensemble_weight = tcfg.ensemble_weight
    if tcfg.test_min_size is not None:
        cfg.inference.min_size_test = tcfg.test_min_size
    if plan.start_weights is not None:
        load_state_dict_checked(model, plan.start_weights)
    model = model.to(ctx.device)
    model.train()
    freeze_clip(model)
    with torch.no_grad():
        class_embeddings = model.encode_text(dataset.class_names)
    forward = TrainingForward(model, class_embeddings).to(ctx.device)
    wrapped = forward
    if ctx.distributed:
        wrapped = nn.parallel.DistributedDataParallel(
            forward, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None)
    criterion = SetCriterion(CriterionConfig(num_classes=len(dataset.class_names), **dataclasses.asdict(tcfg.loss)))
    criterion = criterion.to(ctx.device)
    optimizer = build_optimizer(model, tcfg.solver)
    scheduler = build_scheduler(optimizer, tcfg.solver)
    start_iter = 0
    torch.manual_seed(tcfg.seed * 1009 + ctx.rank)
    if plan.start is not None:
        start_iter = restore_state(plan.start, optimizer, scheduler, ctx)
    truncate_log(out / LOG, start_iter, ctx)
    samples = AugmentedSamples(dataset, tcfg.augment, tcfg.seed)
    batches = IterationBatches(len(dataset), tcfg.solver.ims_per_batch, ctx.rank, ctx.world_size, tcfg.seed,
                               start_iter, tcfg.solver.max_iter)
    loader = batch_loader(samples, batches, tcfg.num_workers)
    use_amp = tcfg.solver.amp and ctx.device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    progress = Progress(ctx.is_main, start_iter, tcfg.solver.max_iter, request.progress)
    last_saved = start_iter
    iteration = start_iter
    tick = time.perf_counter()
    for iteration, batch in enumerate(loader, start=start_iter):
        data_time = time.perf_counter() - tick
        images = batch["images"].to(ctx.device, non_blocking=True)
        targets = [{k: v.to(ctx.device) for k, v in t.items()} for t in batch["targets"]]
        num_masks = torch.tensor([float(sum(len(t["labels"]) for t in targets))], device=ctx.device)
        num_masks = max(float(dist.all_reduce_sum(num_masks)) / ctx.world_size, 1.0)
        with torch.autocast(ctx.device.type, dtype=torch.float16, enabled=use_amp):
            predictions = wrapped(images)
        predictions = [{k: v.float() for k, v in p.items()} for p in predictions]
        losses = criterion(predictions, targets, num_masks=num_masks)
        total = criterion.weighted_total(losses)
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss is {float(total)} at iteration {iteration}: lower --lr or check the data")
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(total).backward()
        scaler.unscale_(optimizer)
        grad_norm = clip_gradients(model, tcfg.solver.clip_grad_norm)
        lr = optimizer.param_groups[0]["lr"]
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        done = iteration + 1
        step_time = time.perf_counter() - tick
        if done % tcfg.log_period == 0 or done == tcfg.solver.max_iter or done == start_iter + 1:
            record = _log_record(done, lr, total, losses, grad_norm, step_time, data_time, progress, ctx)
            if ctx.is_main:
                with open(out / LOG, "a") as handle:
                    handle.write(json.dumps(record) + "\n")
        progress.update(total.item(), lr)
        if done % tcfg.checkpoint_period == 0 and done < tcfg.solver.max_iter:
            _save(out, model, cfg, tcfg, dataset, optimizer, scheduler, done, ctx)
            last_saved = done
        tick = time.perf_counter()
    progress.close()
    done = tcfg.solver.max_iter
    if last_saved != done:
        _save(out, model, cfg, tcfg, dataset, optimizer, scheduler, done, ctx)
    hashes = dist.all_gather_objects(parameter_digest(model))
    if ctx.is_main:
        save_checkpoint(model, cfg, out / FINAL)
        with open(out / LOG, "a") as handle:
            handle.write(json.dumps({"iter": done, "final": str(out / FINAL), "world_size": ctx.world_size,
                                     "parameter_sha256_by_rank": hashes}) + "\n")
    dist.barrier()
    return out / FINAL


def _save(out, model, cfg, tcfg, dataset, optimizer, scheduler, iteration, ctx) -> None:
    save_training_state(out, lambda path: save_checkpoint(model, cfg, path), ctx, iteration, optimizer, scheduler,
                        tcfg.to_dict(), {"name": dataset.name, "items": len(dataset), "classes": dataset.class_names},
                        tcfg.keep_checkpoints)


def _log_record(done, lr, total, losses, grad_norm, step_time, data_time, progress, ctx) -> dict:
    names = sorted(losses)
    values = torch.stack([losses[n].detach().float() for n in names] + [total.detach().float()])
    values = dist.all_reduce_sum(values.clone()) / ctx.world_size
    record = {"iter": done, "lr": lr, "loss": float(values[-1]), "grad_norm": grad_norm,
              "time": round(step_time, 4), "data_time": round(data_time, 4), "eta_s": round(progress.eta(), 1)}
    record.update({n: round(float(v), 6) for n, v in zip(names, values[:-1])})
    return record

"""Pieces of a training loop shared by `scan train` and `scan finetune-clip`.

Restoring a checkpoint's optimizer/scheduler/RNG state, trimming the log on resume, the
parameter digest that proves two runs (or two ranks) ended equal, and the progress bar.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from runtime.files import atomic_write

from .. import distributed as dist
from . import state as ckpt


def parameter_digest(model: nn.Module) -> str:
    """sha256 over every parameter's bytes, in name order: equal digests mean equal models."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        digest.update(name.encode())
        digest.update(param.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def restore_state(start: ckpt.TrainingState, optimizer, scheduler, ctx: dist.DistContext) -> int:
    optimizer.load_state_dict(start.optimizer)
    scheduler.load_state_dict(start.scheduler)
    if len(start.rng) == ctx.world_size:
        torch.set_rng_state(start.rng[ctx.rank])
        if ctx.device.type == "cuda" and start.cuda_rng[ctx.rank] is not None:
            torch.cuda.set_rng_state(start.cuda_rng[ctx.rank], ctx.device)
    elif ctx.is_main:
        print(f"warning: the checkpoint was written by {len(start.rng)} processes, this run has {ctx.world_size}: "
              "the data order is the same, random draws in the model are not", file=sys.stderr)
    return start.iteration


def save_training_state(out: Path, write_model, ctx, iteration: int, optimizer, scheduler, config: dict,
                        dataset: dict, keep: int) -> None:
    """Gather every rank's RNG state, write checkpoint `iter_N` on rank 0 (`write_model(path)` writes
    the model file), and wait until it is there."""
    rng = dist.all_gather_objects(torch.get_rng_state())
    cuda = dist.all_gather_objects(torch.cuda.get_rng_state(ctx.device) if ctx.device.type == "cuda" else None)
    if ctx.is_main:
        state = ckpt.TrainingState(iteration=iteration, optimizer=optimizer.state_dict(),
                                   scheduler=scheduler.state_dict(), rng=rng, cuda_rng=cuda, train_config=config,
                                   dataset=dataset)
        ckpt.save(out, write_model, state, keep)
    dist.barrier()


def truncate_log(path: Path, iteration: int, ctx, key: str = "iter") -> None:
    """Drop log lines past `iteration` (a resumed run writes them again); `key` names the counter."""
    if not ctx.is_main or not path.is_file():
        return
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    kept = [r for r in records if r.get(key, 0) <= iteration and "final" not in r]
    atomic_write(path, lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in kept)))


class Progress:
    """tqdm on rank 0 when stderr is a terminal (or when asked); nothing elsewhere."""

    def __init__(self, main: bool, start: int, total: int, wanted: bool | None, desc: str = "train"):
        self.start, self.total, self.begin = start, total, time.perf_counter()
        self.done = start
        show = main and (sys.stderr.isatty() if wanted is None else wanted)
        self.bar = None
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, desc=desc, unit="it", dynamic_ncols=True)

    def update(self, loss: float, lr: float) -> None:
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", refresh=False)
            self.bar.update(1)

    def eta(self) -> float:
        elapsed = time.perf_counter() - self.begin
        finished = max(self.done - self.start, 1)
        return elapsed / finished * max(self.total - self.done, 0)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

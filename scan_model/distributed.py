"""Process groups under `torchrun`: gloo on CPU, nccl on GPU; one process when not launched by it.

Used by training and by evaluation (which reduces confusion matrices across ranks), so it
lives beside the model rather than inside the training package.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from runtime.errors import ScanError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the process group torchrun describes in the environment, or run alone.

    `device`: "cpu", "cuda" or "auto" (CUDA when present). Each process takes the GPU of its
    local rank. The backend follows the device: nccl for CUDA, gloo for CPU.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device in (None, "auto") else str(device).startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise ScanError(f"device {device!r} requested but no CUDA device is available; use --device cpu")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ScanError(f"local rank {local_rank} has no GPU ({torch.cuda.device_count()} visible): "
                            "start at most one process per GPU (torchrun --nproc-per-node)")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    return DistContext(rank, world, local_rank, dev)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks in place (no-op alone); nccl needs the tensor on the GPU."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(value) -> list:
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, value)
        return gathered
    return [value]


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

"""AdamW groups and the warm-up + cosine schedule of the official CLIP finetuning (SPEC §4.3)."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import FinetuneSolverConfig

# Names that never take weight decay, as open_clip's training script decides it.
_NO_DECAY_WORDS = ("bn", "ln", "bias", "logit_scale")


def takes_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Matrices and embeddings decay; vectors, norms, biases and the temperature do not."""
    return param.ndim >= 2 and not any(word in name for word in _NO_DECAY_WORDS)


def build_optimizer(model: nn.Module, cfg: FinetuneSolverConfig) -> torch.optim.AdamW:
    """Two groups over the trainable parameters (frozen towers are left out)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (decay if takes_weight_decay(name, param) else no_decay).append(param)
    groups = [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": cfg.weight_decay}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(step: int, total_steps: int, warmup_steps: int) -> float:
    """(step + 1) / warmup during warm-up, then half a cosine down to 0 at `total_steps`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    decay_steps = total_steps - warmup_steps
    if decay_steps <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / decay_steps))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, warmup_steps))

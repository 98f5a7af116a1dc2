"""Optimizer, learning-rate schedule and gradient clipping of the official recipe (SPEC §3.4)."""

from __future__ import annotations

import torch
from torch import nn

from .config import SolverConfig

# Parameters of these modules get `weight_decay_norm` (detectron2's list of norm layers).
_NORM_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)
# Parameter names without weight decay wherever they appear (Swin's position tables).
_NO_DECAY_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


def parameter_groups(model: nn.Module, cfg: SolverConfig) -> list[dict]:
    """One group per trainable parameter with its learning rate and weight decay.

    Frozen parameters (both CLIP towers) are left out. Each parameter is listed once, under
    the module that owns it, and named in the group so the choice can be checked.
    """
    groups, seen = [], set()
    for module_name, module in model.named_modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            lr, decay = cfg.base_lr, cfg.weight_decay
            if module_name.split(".")[0] == "backbone":
                lr *= cfg.backbone_multiplier
            if name in _NO_DECAY_NAMES:
                decay = 0.0
            if isinstance(module, _NORM_TYPES):
                decay = cfg.weight_decay_norm
            if isinstance(module, nn.Embedding):
                decay = cfg.weight_decay_embed
            full = f"{module_name}.{name}" if module_name else name
            groups.append({"params": [param], "lr": lr, "weight_decay": decay, "name": full})
    return groups


def build_optimizer(model: nn.Module, cfg: SolverConfig) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(model, cfg), lr=cfg.base_lr, betas=tuple(cfg.betas), eps=cfg.eps)


def lr_factor(iteration: int, cfg: SolverConfig) -> float:
    """Linear warm-up from `warmup_factor`, times poly decay to 0 at `max_iter` (WarmupPolyLR)."""
    warmup = 1.0
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        warmup = cfg.warmup_factor * (1.0 - alpha) + alpha
    return warmup * max(0.0, 1.0 - iteration / cfg.max_iter) ** cfg.poly_power


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: SolverConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Full-model L2 clipping (the official CLIP_TYPE "full_model"); returns the norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if not params:
        return 0.0
    if max_norm <= 0:
        return float(torch.linalg.vector_norm(torch.stack([p.grad.detach().norm() for p in params])))
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

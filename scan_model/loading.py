"""Build a ready-to-run `ScanModel` from what a user passes on the command line."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from runtime.errors import ScanError

from .checkpoint import (
    CheckpointError,
    LoadReport,
    check_clip_weights,
    init_backbone,
    init_clip_towers,
    load_official_into,
    load_state_dict_checked,
    read_checkpoint_config,
    read_safetensors,
)
from .config import ScanConfig
from .model import ScanModel
from .official_config import load_config


@dataclass
class LoadedModel:
    model: ScanModel
    cfg: ScanConfig
    report: LoadReport | None  # None for random weights
    source: str


def resolve_device(device: str | None) -> torch.device:
    """`cpu`, `cuda`, `cuda:N` or None (CUDA when present, else CPU)."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ScanError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ScanError(f"device {device!r} requested but no CUDA device is available; use --device cpu")
    return dev


def load_model(
    checkpoint: str | Path | None = None,
    config: str | Path | None = None,
    device: str | torch.device | None = "cpu",
    seed: int = 0,
    clip_weights: str | Path | None = None,
    backbone_weights: str | Path | None = None,
) -> LoadedModel:
    """Our `.safetensors`, an official `.pth` (needs `config`), or random weights for a config.

    Random weights are seeded, so the same config and seed always give the same model.
    `clip_weights`, a local open_clip file, initialises both CLIP towers of a model built
    without a checkpoint, and `backbone_weights`, a local ImageNet Swin `.pth`, its backbone
    (the starting points of training).
    """
    if checkpoint is None:
        cfg = load_config(config or "tiny")
        if clip_weights is not None:
            check_clip_weights(cfg.clip.model_name, clip_weights)  # fail before the costly build
        model, report, source = _build(cfg, seed), None, f"random weights ({cfg.name}, seed {seed})"
        if clip_weights is not None:
            init_clip_towers(model, clip_weights)
            source += f", CLIP towers from {clip_weights}"
        if backbone_weights is not None:
            init_backbone(model, backbone_weights)
            source += f", Swin backbone from {backbone_weights}"
    else:
        path = Path(checkpoint)
        if not path.is_file():
            raise CheckpointError(f"checkpoint not found: {path}")
        if clip_weights is not None or backbone_weights is not None:
            raise CheckpointError("--clip-weights and --backbone-weights only initialise a model built without --init")
        if path.suffix == ".safetensors":
            cfg = load_config(config) if config else read_checkpoint_config(path)
            model = _build(cfg, seed)
            report = load_state_dict_checked(model, read_safetensors(path))
        else:
            if config is None:
                raise CheckpointError(
                    f"{path} looks like an official checkpoint: pass --config with its official YAML or a preset (tiny, vitb, vitl)"
                )
            cfg = load_config(config)
            model = _build(cfg, seed)
            report = load_official_into(model, path)
        source = str(path)
    dev = device if isinstance(device, torch.device) else resolve_device(device)
    return LoadedModel(model.to(dev).eval(), cfg, report, source)


def _build(cfg: ScanConfig, seed: int) -> ScanModel:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ScanModel(cfg)

"""Checkpoints: official `SCAN.pth` files, our safetensors files, local open_clip weights.

Loading never executes pickled code: official files go through
`torch.load(..., weights_only=True)`, ours are safetensors with a JSON config beside them.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from runtime.errors import ScanError
from runtime.files import atomic_write

from .clip_towers import PRETRAINED_FILES, load_open_clip_weights
from .config import ScanConfig

# Official key prefix -> ours. Entries without a trailing dot are whole keys.
OFFICIAL_PREFIXES: tuple[tuple[str, str], ...] = (
    ("backbone.", "backbone."),
    ("sem_seg_head.pixel_decoder.", "pixel_decoder."),
    ("sem_seg_head.predictor.", "mask_decoder."),
    ("LFM.", "calibration.lfm."),
    ("oriclip_mlp.", "calibration.clip_mlp."),
    ("fusion_decoder.", "calibration.fusion."),
    ("lightweight_transformer.", "calibration.refiner."),
    ("learnable_weight", "calibration.cls_weight"),
    ("clip_adapter.clip_model.", "clip."),
    ("clip_adapter.original_clip.", "original_clip."),
    ("clip_adapter.non_object_embedding", "non_object_embedding"),
)
# Official entries with no counterpart: a training-loss buffer and constants we hold as
# non-persistent buffers (255 x CLIP mean/std).
IGNORED_OFFICIAL_KEYS = ("criterion.empty_weight", "clip_adapter.pixel_mean", "clip_adapter.pixel_std")
FORMAT_NAME = "scan-deploy"


class CheckpointError(ScanError, ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and what to do."""


# What torch.load raises on files that are not (complete) checkpoints or hold pickled code.
_READ_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def official_to_ours(key: str) -> str | None:
    """Our name for an official state-dict key, or None when it has no counterpart."""
    for official, ours in OFFICIAL_PREFIXES:
        if official.endswith("."):
            if key.startswith(official):
                return ours + key[len(official):]
        elif key == official:
            return ours
    return None


@dataclass
class LoadReport:
    missing: list[str] = field(default_factory=list)  # ours, absent from the checkpoint
    unexpected: list[str] = field(default_factory=list)  # checkpoint keys we cannot place
    mismatched: list[str] = field(default_factory=list)  # "key: checkpoint shape vs ours"
    ignored: list[str] = field(default_factory=list)  # known official keys we do not need

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def describe(self, limit: int = 8) -> str:
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected), ("mis-shaped", self.mismatched)):
            if keys:
                shown = ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        return "; ".join(parts) if parts else "all keys matched"


def convert_official_state_dict(state_dict: dict[str, Tensor]) -> tuple[dict[str, Tensor], LoadReport]:
    """Rename an official state dict to our names; unknown keys are reported, not dropped silently."""
    report = LoadReport()
    converted = {}
    for key, value in state_dict.items():
        if key in IGNORED_OFFICIAL_KEYS:
            report.ignored.append(key)
            continue
        ours = official_to_ours(key)
        if ours is None:
            report.unexpected.append(key)
        else:
            converted[ours] = value
    return converted, report


def load_state_dict_checked(model: torch.nn.Module, state_dict: dict[str, Tensor], report: LoadReport | None = None) -> LoadReport:
    """Strict load with a full report of missing, unexpected and mis-shaped keys."""
    report = report or LoadReport()
    own = model.state_dict()
    for key, value in state_dict.items():
        if key not in own:
            report.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            report.mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
    report.missing.extend(k for k in own if k not in state_dict)
    if not report.ok:
        raise CheckpointError(f"checkpoint does not fit the config: {report.describe()}")
    model.load_state_dict(state_dict, strict=True)
    return report


def read_official_checkpoint(path: str | Path) -> dict[str, Tensor]:
    """The state dict of an official (detectron2-format) checkpoint, read without pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except _READ_ERRORS as exc:
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint with weights_only=True: {_first_line(exc)}") from None
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise CheckpointError(f"{path} holds no state dict (expected a dict of tensors, optionally under 'model')")
    return data


def load_official_into(model: torch.nn.Module, path: str | Path) -> LoadReport:
    converted, report = convert_official_state_dict(read_official_checkpoint(path))
    return load_state_dict_checked(model, converted, report)


# -- our format ------------------------------------------------------------------------------
def config_path_for(weights: Path) -> Path:
    return weights.with_suffix(".json")


def save_checkpoint(model: torch.nn.Module, cfg: ScanConfig, path: str | Path) -> Path:
    """Write `<path>.safetensors` and its config `<path>.json` (each atomically)."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_suffix(".safetensors")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config_text = json.dumps(cfg.to_dict(), indent=1, sort_keys=True)
    metadata = {"format": FORMAT_NAME, "config": config_text}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    atomic_write(config_path_for(path), lambda tmp: tmp.write_text(config_text + "\n"))
    return path


def read_checkpoint_config(path: str | Path) -> ScanConfig:
    """The config saved with one of our checkpoints: the JSON beside it, else the embedded copy."""
    from safetensors import safe_open

    path = Path(path)
    sidecar = config_path_for(path)
    if sidecar.is_file():
        text = sidecar.read_text()
    else:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get("config")
        if text is None:
            raise CheckpointError(f"{path} carries no config and {sidecar} does not exist: pass --config")
    try:
        cfg = ScanConfig.from_dict(json.loads(text))
        cfg.validate()
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"bad config for {path}: {exc}") from None
    return cfg


def read_safetensors(path: str | Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot read {path} as safetensors: {exc}") from None


# -- open_clip weights for the CLIP towers ----------------------------------------------------
def check_clip_weights(clip_name: str, weights: str | Path) -> Path:
    """`weights` as a path to an existing file; a pretrained tag gets the name of the file to pass."""
    path = Path(weights)
    if not path.is_file():
        hint = PRETRAINED_FILES.get(clip_name, "the open_clip weights file of this CLIP model")
        raise CheckpointError(
            f"CLIP weights {str(weights)!r} is not a local file; nothing is downloaded: pass the path of {hint}"
        )
    return path


def init_clip_towers(model: torch.nn.Module, weights: str | Path) -> None:
    """Initialise both CLIP towers from a LOCAL open_clip checkpoint (nothing is downloaded).

    The finetuned tower and the text tower take the whole file; the frozen original tower
    takes its visual part, as the official code does before training (SPEC §3.4).
    """
    path = check_clip_weights(model.cfg.clip.model_name, weights)
    try:
        state = load_open_clip_weights(path)
    except _READ_ERRORS as exc:
        raise CheckpointError(f"cannot read open_clip weights {path}: {_first_line(exc)}") from None
    report = LoadReport()
    try:
        load_state_dict_checked(model.clip, state, report)
        visual = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
        load_state_dict_checked(model.original_clip, visual)
    except CheckpointError as exc:
        raise CheckpointError(f"{path} does not fit CLIP {model.cfg.clip.model_name}: {exc}") from None


# -- ImageNet Swin weights for the backbone (the official training's starting point) ----------------
# Keys of the classification checkpoint that the segmentation backbone has no use for.
_SWIN_CLASSIFIER_KEYS = ("head.", "norm.")


def init_backbone(model: torch.nn.Module, weights: str | Path) -> LoadReport:
    """Initialise the Swin backbone from a LOCAL ImageNet Swin checkpoint (SPEC §3.4).

    Takes Microsoft's original `swin_base_patch4_window12_384_22k.pth` (a `{"model": state_dict}`
    file, read with weights_only=True) or a safetensors file with the same key names. The
    detectron2 `.pkl` the official code converts it to is a pickle and is refused: pass the
    `.pth` it was made from. The classifier head, the final norm and precomputed attention masks
    are not used; every other backbone tensor must be present with the right shape, except the
    output norms `norm0..3` that the segmentation backbone adds (they keep their initialisation).
    """
    path = Path(weights)
    if not path.is_file():
        raise CheckpointError(f"backbone weights not found: {path}; nothing is downloaded, pass a local file")
    if path.suffix == ".pkl":
        raise CheckpointError(f"{path} is a detectron2 pickle, which is never unpickled here: pass the original "
                              "Swin .pth it was converted from (e.g. swin_base_patch4_window12_384_22k.pth)")
    if path.suffix == ".safetensors":
        state = read_safetensors(path)
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except _READ_ERRORS as exc:
            raise CheckpointError(f"cannot read {path} with weights_only=True: {_first_line(exc)}") from None
        state = data.get("model", data) if isinstance(data, dict) else None
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds no state dict (expected a dict of tensors, optionally under 'model')")
    backbone = model.backbone
    own = backbone.state_dict()
    report = LoadReport()
    usable = {}
    for key, value in state.items():
        if key.startswith(_SWIN_CLASSIFIER_KEYS) or key.endswith(("attn_mask", "relative_position_index")):
            report.ignored.append(key)
        elif key not in own:
            report.unexpected.append(key)
        elif tuple(own[key].shape) != tuple(value.shape):
            report.mismatched.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(own[key].shape)}")
        else:
            usable[key] = value
    own_norms = [k for k in own if k.split(".")[0] in ("norm0", "norm1", "norm2", "norm3")]
    report.missing.extend(k for k in own if k not in usable and k not in own_norms
                          and not k.endswith("relative_position_index"))
    if not report.ok:
        raise CheckpointError(f"{path} does not fit the {model.cfg.name} Swin backbone: {report.describe()}")
    backbone.load_state_dict(usable, strict=False)
    return report

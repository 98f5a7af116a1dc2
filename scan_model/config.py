"""The whole-model configuration: one dataclass per part, composed into `ScanConfig`.

The part configs live beside their modules (as in open_clip); this file only composes
them, holds the inference settings and converts to and from plain JSON.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field

from runtime.errors import ScanError
from runtime.settings import InferenceSettings, SettingsError

from .calibration import CalibrationConfig
from .clip_towers import ClipConfig
from .mask_decoder import MaskDecoderConfig
from .pixel_decoder import PixelDecoderConfig
from .swin import SwinConfig

# Swin (ImageNet) normalisation of SPEC §1.2, in 0..255 units; CLIP's is in regions.py.
SWIN_PIXEL_MEAN = (123.675, 116.280, 103.530)
SWIN_PIXEL_STD = (58.395, 57.120, 57.375)



class ConfigError(ScanError, ValueError):
    """A config that cannot be turned into a `ScanConfig`; the message says why."""


@dataclass
class InferenceConfig:
    """Test-time settings (SPEC §1.1, §1.11-§1.13, §5.3).

    `log_ensemble` replaces the official dataset-name check (ovseg_model.py:338): the
    official code turns it on for ADE-847 and PASCAL-Context-459 only.
    """

    mask_threshold: float = 0.4
    ensemble_weight: float = 0.7
    replace_ratio: float = 0.15
    replace_layers: tuple[int, ...] = (1, 3, 5)
    shift_rule: str = "deterministic"
    shift_seed: int = 0
    log_ensemble: bool = False
    templates: str = "vild"
    min_size_test: int = 640
    max_size_test: int = 2560
    size_divisibility: int = 32
    pixel_mean: tuple[float, float, float] = SWIN_PIXEL_MEAN
    pixel_std: tuple[float, float, float] = SWIN_PIXEL_STD
    # Number of region crops sent through the region CLIP at once: bounds peak memory, and 8 keeps a
    # ViT-B batch's activations in cache (on 2 CPU cores, 1.15x faster per crop than 32).
    region_batch_size: int = 8

    def settings(self) -> InferenceSettings:
        """The per-call settings these defaults stand for (validated)."""
        return InferenceSettings(**{f.name: getattr(self, f.name) for f in dataclasses.fields(InferenceSettings)})

    def validate(self) -> None:
        self.settings()  # raises SettingsError naming the bad value
        if self.region_batch_size < 1:
            raise SettingsError("region batch size must be at least 1")


@dataclass
class ScanConfig:
    """Everything needed to build a `ScanModel`."""

    name: str = "vitb"
    swin: SwinConfig = field(default_factory=SwinConfig)
    pixel_decoder: PixelDecoderConfig = field(default_factory=PixelDecoderConfig)
    mask_decoder: MaskDecoderConfig = field(default_factory=MaskDecoderConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    clip: ClipConfig = field(default_factory=ClipConfig)
    # Original-CLIP block outputs fed to the frequency module (official SELECT_ORI_CLIP_ID, 1-based).
    clip_tap_layers: tuple[int, ...] = (6, 9, 12)
    inference: InferenceConfig = field(default_factory=InferenceConfig)

    def validate(self) -> None:
        """Cross-part consistency checks, with messages that say which values disagree."""
        self.inference.validate()
        cal, clip = self.calibration, self.clip
        problems = []
        if len(self.clip_tap_layers) != len(cal.sigmas):
            problems.append(f"{len(self.clip_tap_layers)} CLIP tap layers but {len(cal.sigmas)} frequency sigmas")
        if cal.clip_width != clip.width:
            problems.append(f"CLIP_VISION_DIM {cal.clip_width} != CLIP width {clip.width} of {clip.model_name}")
        if cal.embed_dim != clip.embed_dim:
            problems.append(f"SCAN_DIM {cal.embed_dim} != CLIP embed dim {clip.embed_dim} of {clip.model_name}")
        if cal.grid_size != clip.grid_size:
            problems.append(f"PATCH_SIZE (token grid) {cal.grid_size} != CLIP grid {clip.grid_size} of {clip.model_name}")
        if self.mask_decoder.embed_dim != cal.embed_dim:
            problems.append(f"EMBEDDING_DIM {self.mask_decoder.embed_dim} != SCAN_DIM {cal.embed_dim}")
        layers = clip.layers
        for name, ids in (("SELECT_ORI_CLIP_ID", self.clip_tap_layers), ("REPLACE_LAYER", self.inference.replace_layers)):
            bad = [i for i in ids if not 0 <= i <= layers]
            if bad:
                problems.append(f"{name} {list(bad)} outside 0..{layers} for {clip.model_name}")
        if self.pixel_decoder.conv_dim != self.mask_decoder.in_channels:
            problems.append("pixel decoder conv_dim != mask decoder in_channels")
        if self.pixel_decoder.mask_dim != self.mask_decoder.mask_dim:
            problems.append("pixel decoder mask_dim != mask decoder mask_dim")
        swin_channels = tuple(self.swin.embed_dim * 2**i for i in range(4))
        if tuple(self.pixel_decoder.in_channels) != swin_channels:
            problems.append(f"pixel decoder in_channels {self.pixel_decoder.in_channels} != Swin outputs {swin_channels}")
        if problems:
            raise ConfigError("inconsistent SCAN config: " + "; ".join(problems))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ScanConfig":
        return _from_dict(cls, data)


def _from_dict(cls, data):
    """Build dataclass `cls` from plain JSON data, turning lists back into tuples."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} field(s): {', '.join(unknown)}")
    kwargs = {}
    for name, value in data.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _from_dict(hint, value)
        elif isinstance(value, list) and typing.get_origin(hint) is tuple:
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = value
    return cls(**kwargs)

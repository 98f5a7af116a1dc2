"""Named configurations: the two official models and a tiny one for tests and demos.

`vitl` and `vitb` are `configs/scan_vitL.yaml` / `configs/scan_vitB.yaml` of the official
code (10 decoder layers: the official predictor uses DEC_LAYERS without subtracting one).
`tiny` is the architecture of the official fixture (`official_dev/config.yaml`) with the
official default contextual-shift ratio.
"""

from __future__ import annotations

from runtime.settings import BENCHMARK_SETTINGS, LOG_ENSEMBLE_BENCHMARKS, benchmark_settings

from .calibration import CalibrationConfig
from .clip_towers import clip_config
from .config import ConfigError, InferenceConfig, ScanConfig
from .mask_decoder import MaskDecoderConfig
from .pixel_decoder import PixelDecoderConfig
from .swin import SwinConfig


def vitb() -> ScanConfig:
    return ScanConfig(
        name="vitb",
        swin=SwinConfig(),
        pixel_decoder=PixelDecoderConfig(),
        mask_decoder=MaskDecoderConfig(embed_dim=512),
        calibration=CalibrationConfig(clip_width=768, embed_dim=512, grid_size=14),
        clip=clip_config("ViT-B-16"),
        clip_tap_layers=(6, 9, 12),
        inference=InferenceConfig(replace_layers=(1, 3, 5)),
    )


def vitl() -> ScanConfig:
    return ScanConfig(
        name="vitl",
        swin=SwinConfig(),
        pixel_decoder=PixelDecoderConfig(),
        mask_decoder=MaskDecoderConfig(embed_dim=768),
        calibration=CalibrationConfig(clip_width=1024, embed_dim=768, grid_size=16),
        clip=clip_config("ViT-L-14"),
        clip_tap_layers=(12, 18, 24),
        inference=InferenceConfig(replace_layers=(1, 3, 5, 7, 9)),
    )


def tiny() -> ScanConfig:
    return ScanConfig(
        name="tiny",
        swin=SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), window_size=7),
        pixel_decoder=PixelDecoderConfig(in_channels=(32, 64, 128, 256), conv_dim=64, mask_dim=64, num_encoder_layers=2),
        mask_decoder=MaskDecoderConfig(
            in_channels=64, hidden_dim=64, ffn_dim=128, num_layers=4, mask_dim=64, embed_dim=64, embed_hidden_dim=128
        ),
        calibration=CalibrationConfig(clip_width=64, embed_dim=64, grid_size=14),
        clip=clip_config("SCAN-tiny-16"),
        clip_tap_layers=(2, 4, 6),
        inference=InferenceConfig(replace_layers=(1, 3, 5)),
    )


PRESETS = {"tiny": tiny, "vitb": vitb, "vitl": vitl}
__all__ = ["BENCHMARK_SETTINGS", "LOG_ENSEMBLE_BENCHMARKS", "PRESETS", "apply_benchmark_settings", "preset"]


def preset(name: str) -> ScanConfig:
    """The named preset; an unknown name gets an error listing the known ones."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def apply_benchmark_settings(cfg: ScanConfig, benchmark: str) -> bool:
    """Switch `cfg.inference` to the official settings for `benchmark`; False if none exist.

    Prefer passing `benchmark_settings(cfg.name, benchmark)` per call; this edits the config
    for the callers that build a model for one benchmark.
    """
    values = benchmark_settings(cfg.name, benchmark)
    if values is None:
        return False
    for name, value in values.items():
        setattr(cfg.inference, name, value)
    return True

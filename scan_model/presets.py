"""Named configurations: the two official models and a tiny one for tests and demos.

`vitl` and `vitb` are `configs/scan_vitL.yaml` / `configs/scan_vitB.yaml` of the official
code (10 decoder layers: the official predictor uses DEC_LAYERS without subtracting one).
`tiny` is the architecture of the official fixture (`official_dev/config.yaml`) with the
official default contextual-shift ratio.
"""

from __future__ import annotations

from .calibration import CalibrationConfig
from .clip_towers import clip_config
from .config import InferenceConfig, ScanConfig
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

# Official per-benchmark test settings (SPEC §5.3): mask threshold, ensemble weight,
# contextual-shift ratio; the log ensemble is on for ADE-847 and PASCAL-Context-459.
BENCHMARK_SETTINGS = {
    "vitl": {
        "ade847": (0.30, 0.75, 0.15),
        "ade150": (0.55, 0.75, 0.05),
        "pc459": (0.25, 0.65, 0.05),
        "pc59": (0.50, 0.50, 0.05),
        "voc20": (0.20, 0.65, 0.10),
    },
    "vitb": {
        "ade847": (0.25, 0.75, 0.05),
        "ade150": (0.40, 0.70, 0.05),
        "pc459": (0.25, 0.70, 0.05),
        "pc59": (0.25, 0.35, 0.05),
        "voc20": (0.20, 0.45, 0.10),
    },
}
LOG_ENSEMBLE_BENCHMARKS = ("ade847", "pc459")


def preset(name: str) -> ScanConfig:
    """The named preset; an unknown name gets an error listing the known ones."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def apply_benchmark_settings(cfg: ScanConfig, benchmark: str) -> bool:
    """Switch `cfg.inference` to the official settings for `benchmark`; False if none exist."""
    table = BENCHMARK_SETTINGS.get(cfg.name, {})
    if benchmark not in table:
        return False
    thr, weight, ratio = table[benchmark]
    inf = cfg.inference
    inf.mask_threshold, inf.ensemble_weight, inf.replace_ratio = thr, weight, ratio
    inf.log_ensemble = benchmark in LOG_ENSEMBLE_BENCHMARKS
    return True

"""Per-call inference settings and the official per-benchmark values (SPEC §5.3).

These are settings of a call, never constants of a graph: one bundle serves every
benchmark. The eager model (`scan_model.presets`) and the runtime read the same table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .errors import ScanError

SHIFT_RULES = ("deterministic", "official")

# model name -> benchmark -> (mask threshold, CLIP ensemble weight, contextual-shift ratio).
BENCHMARK_SETTINGS: dict[str, dict[str, tuple[float, float, float]]] = {
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
# The official code turns the log ensemble on for these two by comparing dataset names.
LOG_ENSEMBLE_BENCHMARKS = ("ade847", "pc459")


class SettingsError(ScanError):
    """An inference setting out of range; the message names it and its range."""


@dataclass(frozen=True)
class InferenceSettings:
    """What the official code varies per benchmark, plus the contextual-shift rule.

    shift_rule: "deterministic" ranks background patches by a fixed key (seeded by
    `shift_seed`); "official" draws a fresh uniform random subset per region and layer, as
    the official `random.sample` does (seeded here, so reproducible for a given seed).
    """

    mask_threshold: float = 0.4
    ensemble_weight: float = 0.7
    replace_ratio: float = 0.15
    log_ensemble: bool = False
    shift_rule: str = "deterministic"
    shift_seed: int = 0

    def __post_init__(self) -> None:
        if self.shift_rule not in SHIFT_RULES:
            raise SettingsError(f"unknown contextual-shift rule {self.shift_rule!r}; use one of {', '.join(SHIFT_RULES)}")
        if not 0.0 <= self.mask_threshold < 1.0:
            raise SettingsError(f"mask threshold must be in [0, 1), got {self.mask_threshold}")
        if not 0.0 <= self.ensemble_weight <= 1.0:
            raise SettingsError(f"ensemble weight must be in [0, 1], got {self.ensemble_weight}")
        if not 0.0 <= self.replace_ratio <= 1.0:
            raise SettingsError(f"replace ratio must be in [0, 1], got {self.replace_ratio}")

    def replace(self, **changes) -> "InferenceSettings":
        """A copy with `changes` applied; None values keep the current setting."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})


def benchmark_settings(model_name: str, benchmark: str) -> dict | None:
    """The official settings of `benchmark` for `model_name` as keyword arguments, or None."""
    values = BENCHMARK_SETTINGS.get(model_name, {}).get(benchmark)
    if values is None:
        return None
    thr, weight, ratio = values
    return dict(mask_threshold=thr, ensemble_weight=weight, replace_ratio=ratio,
                log_ensemble=benchmark in LOG_ENSEMBLE_BENCHMARKS)


def shift_counts(num_patches: int, ratio: float) -> list[int]:
    """Entry c = int(ratio * c) in Python's float64, exactly as the official code counts.

    A float32 floor inside a graph differs for some ratios (0.29 * 100), so the runtime sends
    this table to the CLIP adapter as an input.
    """
    return [int(ratio * c) for c in range(num_patches + 1)]


def shift_key(num_patches: int, seed: int = 0) -> np.ndarray:
    """The deterministic rule's fixed ranking of the patches: a seeded permutation, int64 (P,)."""
    return np.random.default_rng(seed).permutation(num_patches).astype(np.int64)


def random_shift_keys(layers: int, regions: int, num_patches: int, rng: np.random.Generator) -> np.ndarray:
    """A fresh permutation per layer and region, int64 (R, N, P): the official rule's uniform draws."""
    keys = np.broadcast_to(np.arange(num_patches, dtype=np.int64), (layers, regions, num_patches))
    return rng.permuted(keys, axis=-1)

"""The typed result of a segmentation, the same for the eager model and the deployed runtime."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class SegmentationResult:
    label_map: np.ndarray  # (H, W) int64 class indices at the input image's size
    classes: list[str]
    sem_seg: np.ndarray | None = None  # (K, H, W) float32 scores, when asked for
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage
    model_input_size: tuple[int, int] = (0, 0)  # (h, w) after the test resize
    num_regions: int = 0  # masks that passed the threshold and went through the region CLIP
    label_scores: np.ndarray | None = None  # (H, W) float32 score of each pixel's label (its class's maximum)

    @property
    def present(self) -> list[int]:
        """Class indices that occur in the label map, most pixels first."""
        counts = np.bincount(self.label_map.ravel(), minlength=len(self.classes))
        return [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]

"""Finetuning batches: region crop, mask, full image, text tokens and shift keys per sample.

Every random choice of a sample (its random resized crop, its template, the patches the
contextual shift replaces at each listed layer) is drawn from a generator seeded with
(seed, epoch, sample index), so step `s` sees the same numbers in a fresh run, a resumed run,
and under any number of processes or loader workers.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ..text import VILD_TEMPLATES, tokenize
from .region_data import RegionRecord, region_sample


class RegionPairs(Dataset):
    """Indexed by (epoch, index) like the segmentation training's samples."""

    def __init__(self, records: list[RegionRecord], seed: int, num_patches: int, shift_layers: int,
                 text_mode: str = "caption"):
        self.records, self.seed = records, seed
        self.num_patches, self.shift_layers, self.text_mode = num_patches, shift_layers, text_mode

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        record = self.records[index]
        rng = np.random.default_rng([self.seed, epoch, index])
        sample = region_sample(record, rng)
        text = record.text
        if self.text_mode == "vild":
            text = VILD_TEMPLATES[int(rng.integers(len(VILD_TEMPLATES)))].format(text)
        keys = np.stack([rng.permutation(self.num_patches) for _ in range(self.shift_layers)])
        return {
            "region": torch.from_numpy(sample["region"]),
            "mask": torch.from_numpy(sample["mask"]),
            "image": torch.from_numpy(sample["image"]),
            "tokens": tokenize(text)[0],
            "shift_keys": torch.from_numpy(keys.astype(np.int64)),
        }


def collate(samples: list[dict]) -> dict:
    return {name: torch.stack([s[name] for s in samples]) for name in samples[0]}

"""Training batches: which sample each rank reads at each iteration, augmented reproducibly.

Everything random in the data is a function of (seed, epoch, sample index): the order comes
from a seeded permutation per epoch and each sample's augmentation from its own generator.
So iteration `it` reads the same pixels in a fresh run, in a resumed run, with any number of
loader workers, and (for the same global batch) with any number of processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from runtime.datasets import SegmentationDataset

from .augment import AugmentConfig, augment, targets_from_label


class AugmentedSamples(Dataset):
    """Indexed by (epoch, sample index): the augmented image and its per-class targets."""

    def __init__(self, dataset: SegmentationDataset, cfg: AugmentConfig, seed: int):
        # Crops are padded with the dataset's own ignore value (65535 for the 16-bit benchmarks).
        self.dataset, self.cfg, self.seed = dataset, dataclasses.replace(cfg, ignore_label=dataset.ignore_label), seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        epoch, index = key
        rng = np.random.default_rng([self.seed, epoch, index])
        image, label = self.dataset.read(index)
        image, label = augment(image, label, self.cfg, rng)
        classes, masks = targets_from_label(label, self.dataset.ignore_label)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float(),
            "labels": torch.from_numpy(classes),
            "masks": torch.from_numpy(masks),
            "index": index,
        }


class IterationBatches(Sampler):
    """Yields this rank's share of the global batch for iterations start .. max_iter - 1."""

    def __init__(self, num_samples: int, global_batch: int, rank: int, world_size: int, seed: int,
                 start_iter: int, max_iter: int):
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} does not split evenly over {world_size} processes")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.per_rank = global_batch // world_size
        self.rank, self.seed = rank, seed
        self.start_iter, self.max_iter = start_iter, max_iter
        self._orders: dict[int, list[int]] = {}

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._orders:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._orders = {epoch: torch.randperm(self.num_samples, generator=generator).tolist()}
        return self._orders[epoch]

    def keys(self, iteration: int) -> list[tuple[int, int]]:
        first = iteration * self.global_batch + self.rank * self.per_rank
        keys = []
        for position in range(first, first + self.per_rank):
            epoch, offset = divmod(position, self.num_samples)
            keys.append((epoch, self._order(epoch)[offset]))
        return keys

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for iteration in range(self.start_iter, self.max_iter):
            yield self.keys(iteration)

    def __len__(self) -> int:
        return max(0, self.max_iter - self.start_iter)


def collate(samples: list[dict]) -> dict:
    return {
        "images": torch.stack([s["image"] for s in samples]),
        "targets": [{"labels": s["labels"], "masks": s["masks"]} for s in samples],
        "indices": [s["index"] for s in samples],
    }


def batch_loader(samples: AugmentedSamples, batches: IterationBatches, num_workers: int) -> DataLoader:
    # A private generator: the loader must not draw from the global torch RNG, whose state is
    # part of what a checkpoint restores (dropout, drop path, point sampling).
    return DataLoader(samples, batch_sampler=batches, num_workers=num_workers, collate_fn=collate,
                      generator=torch.Generator().manual_seed(0), persistent_workers=False)

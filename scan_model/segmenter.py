"""Eager segmentation of user images: load, resize, run `ScanModel`, resize back.

`EagerSegmenter` mirrors the torch-free `runtime` API (`set_vocabulary`, `segment`) so the
two backends are interchangeable behind the CLI.
"""

from __future__ import annotations

import random
import time

import numpy as np
import torch
import torch.nn.functional as F

from runtime.errors import ScanError
from runtime.images import ImageError, load_image, resize_shortest_edge
from runtime.result import SegmentationResult
from runtime.settings import InferenceSettings, benchmark_settings
from runtime.vocab import parse_vocabulary

from .model import ScanModel

# Classes resized to the original image size at once when painting the label map: bounds
# memory for large vocabularies on large images.
_CLASS_CHUNK = 64


class EagerSegmenter:
    """Segment images with the PyTorch reference model.

    Args:
        model: a `ScanModel` in eval mode, on its device.
        resize: apply the official test resize (shortest edge 640, long edge at most 2560);
            False feeds the image at its own size (padding to /32 still applies).
        seed: seeds the official (random) contextual-shift rule when the config selects it.
    """

    def __init__(self, model: ScanModel, resize: bool = True, seed: int = 0):
        self.model = model
        self.resize = resize
        self.rng = random.Random(seed)
        self._text_cache: dict[str, torch.Tensor] = {}
        self.classes: list[str] = []
        self._classifier: torch.Tensor | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def set_vocabulary(self, vocabulary) -> list[str]:
        """Names, a preset or a file (see `runtime.vocab.parse_vocabulary`); encodes only new names."""
        names = parse_vocabulary(vocabulary)
        missing = [n for n in names if n not in self._text_cache]
        if missing:
            embeddings = self.model.encode_text(missing)
            self._text_cache.update(zip(missing, embeddings))
        class_embeddings = torch.stack([self._text_cache[n] for n in names])
        self._classifier = self.model.text_classifier(class_embeddings)
        self.classes = names
        return names

    @property
    def settings(self) -> InferenceSettings:
        """The default settings of a call: the model config's."""
        return self.model.cfg.inference.settings()

    def settings_for(self, benchmark: str) -> InferenceSettings:
        """The official settings of `benchmark` (ade150, ...) for this model, or the defaults if it has none."""
        return self.settings.replace(**(benchmark_settings(self.model.cfg.name, benchmark) or {}))

    @torch.no_grad()
    def segment(
        self, image, return_scores: bool = False, settings: InferenceSettings | None = None, **overrides
    ) -> SegmentationResult:
        """One image (path, PIL image or HxWx3 uint8 array) -> `SegmentationResult`.

        `settings` (default: the model's) with `overrides` (mask_threshold, ensemble_weight,
        replace_ratio, log_ensemble, shift_rule, shift_seed) apply to this call only.
        """
        if self._classifier is None:
            raise ScanError("no vocabulary set: call set_vocabulary(names) first")
        settings = (settings or self.settings).replace(**overrides)
        timings: dict[str, float] = {}
        start = time.perf_counter()
        array = load_image(image)
        height, width = array.shape[:2]
        inf = self.model.cfg.inference
        if not self.resize and max(height, width) > inf.max_size_test:
            # Memory grows with Q x H x W mask probabilities; the official test resize caps the
            # long side at max_size_test, and so do we when resizing is switched off.
            raise ImageError(
                f"image of {width}x{height} exceeds {inf.max_size_test} pixels on its long side; "
                "drop --no-resize (the official test resize) or shrink the image"
            )
        resized = resize_shortest_edge(array, inf.min_size_test, inf.max_size_test) if self.resize else array
        tensor = torch.from_numpy(np.array(resized, dtype=np.uint8)).to(self.device)
        tensor = tensor.permute(2, 0, 1)[None].float()
        timings["preprocess"] = time.perf_counter() - start

        out = self.model(tensor, self._classifier, rng=self.rng, timings=timings, settings=settings)

        start = time.perf_counter()
        label_map, scores, best = _postprocess(out.sem_seg, (height, width), return_scores)
        timings["postprocess"] = time.perf_counter() - start
        return SegmentationResult(
            label_map, list(self.classes), scores, timings, tuple(resized.shape[:2]), int(out.regions.valid.sum()), best
        )


def _postprocess(sem_seg: torch.Tensor, size: tuple[int, int], keep_scores: bool):
    """Resize (K, h, w) scores to the image size (bilinear, as `sem_seg_postprocess`) and argmax:
    (labels, the (K, H, W) scores when kept, each pixel's label score).

    The argmax runs over class chunks with a running maximum, so the full (K, H, W) tensor
    at the original size exists only when the caller asks for the scores.
    """
    same_size = tuple(sem_seg.shape[-2:]) == tuple(size)
    best_val = best_idx = None
    kept = []
    for start in range(0, sem_seg.shape[0], _CLASS_CHUNK):
        chunk = sem_seg[start : start + _CLASS_CHUNK]
        if not same_size:
            chunk = F.interpolate(chunk[None], size=size, mode="bilinear", align_corners=False)[0]
        val, idx = chunk.max(0)
        idx = idx + start
        if best_val is None:
            best_val, best_idx = val, idx
        else:
            # Strictly greater keeps the first maximum, as a single argmax would.
            better = val > best_val
            best_val = torch.where(better, val, best_val)
            best_idx = torch.where(better, idx, best_idx)
        if keep_scores:
            kept.append(chunk.float().cpu().numpy())
    scores = np.concatenate(kept) if keep_scores else None
    return best_idx.cpu().numpy().astype(np.int64), scores, best_val.float().cpu().numpy()

"""Zero-shot classification of ground-truth region crops: the check run after each epoch.

The official script evaluates on ADE-150 ground-truth mask crops (`ade_gt_150cls_val`); this
does the same for the validation split of any dataset: every region (a class's mask in an
image) is cropped as in training but without randomness, encoded by the region tower with
the contextual shift (the fixed key of inference), and classified against the class names
encoded as SCAN encodes them at test time (the 14 VILD templates, averaged).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import distributed as dist
from ..text import encode_class_names
from .model import ContextualShiftClip
from .region_data import RegionRecord, region_sample


@torch.no_grad()
def class_features(model: ContextualShiftClip, class_names: list[str], device: torch.device) -> torch.Tensor:
    """(K, E) unit-norm text features of the class names, as SCAN encodes them at test time."""
    return encode_class_names(model.clip_model, class_names).to(device)


@torch.no_grad()
def zeroshot_accuracy(model: ContextualShiftClip, records: list[RegionRecord], class_names: list[str],
                      classifier: torch.Tensor, device: torch.device, rank: int = 0, world: int = 1, batch_size: int = 32) -> dict:
    """Top-1 accuracy and mean per-class accuracy over `records` (split across ranks, summed).

    `classifier`: `class_features(model, class_names, device)`, row k = class id k.
    """
    was_training = model.training
    model.eval()
    num_classes = len(class_names)
    correct = torch.zeros(num_classes, dtype=torch.float64, device=device)
    total = torch.zeros(num_classes, dtype=torch.float64, device=device)
    mine = records[rank::world]
    for start in range(0, len(mine), batch_size):
        chunk = mine[start:start + batch_size]
        samples = [region_sample(record, None) for record in chunk]
        regions, masks, images = (torch.stack([torch.from_numpy(s[k]) for s in samples]).to(device)
                                  for k in ("region", "mask", "image"))
        features = F.normalize(model.encode_regions(regions, masks, images).float(), dim=-1)
        predicted = (features @ classifier.t()).argmax(dim=-1)
        truth = torch.tensor([record.class_id for record in chunk], device=device)
        total += torch.bincount(truth, minlength=num_classes).double()
        correct += torch.bincount(truth[predicted == truth], minlength=num_classes).double()
    counts = dist.all_reduce_sum(torch.stack([correct, total]))
    correct, total = counts[0], counts[1]
    model.train(was_training)
    present = total > 0
    per_class = {name: round(float(c / t), 4) for name, c, t, p in zip(class_names, correct, total, present) if p}
    return {
        "regions": int(total.sum()),
        "top1": float(correct.sum() / total.sum().clamp_min(1)),
        "mean_class_acc": float((correct[present] / total[present]).mean()) if present.any() else 0.0,
        "per_class": per_class,
    }

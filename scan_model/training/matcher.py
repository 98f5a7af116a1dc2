"""Hungarian matching of predicted masks to ground-truth masks, per image (SPEC.md §3.3).

cost = cost_class * (-p_target) + cost_mask * pointwise BCE + cost_dice * dice, with masks compared
at ``num_points`` uniform points shared by every prediction and target of the image; the
assignment minimising the total cost comes from scipy's ``linear_sum_assignment``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from .points import point_sample, random_points


@dataclass
class MatcherConfig:
    cost_class: float = 2.0
    cost_mask: float = 5.0
    cost_dice: float = 5.0
    num_points: int = 12544


def mask_cost_matrices(pred_points: Tensor, tgt_points: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise (Q, T) BCE and dice costs from mask logits (Q, P) and target values (T, P).

    BCE with logits is linear in the target, ``y * softplus(-x) + (1 - y) * softplus(x)``, so the
    mean over points for every pair is two matrix products instead of a Q x T loop.
    """
    num_points = pred_points.shape[1]
    pos = F.softplus(-pred_points)  # BCE against target 1
    neg = F.softplus(pred_points)  # BCE against target 0
    bce = (pos @ tgt_points.T + neg @ (1.0 - tgt_points).T) / num_points
    prob = pred_points.sigmoid()
    numerator = 2.0 * prob @ tgt_points.T
    denominator = prob.sum(-1)[:, None] + tgt_points.sum(-1)[None, :]
    dice = 1.0 - (numerator + 1.0) / (denominator + 1.0)
    return bce, dice


def match_costs(
    class_logits: Tensor,
    mask_logits: Tensor,
    target_classes: Tensor,
    target_masks: Tensor,
    cfg: MatcherConfig,
    generator: torch.Generator | None = None,
) -> Tensor:
    """(Q, T) float32 matching cost for one image.

    class_logits (Q, K+1), mask_logits (Q, H, W), target_classes (T,), target_masks (T, Ht, Wt)
    bool or float. Draws one set of ``cfg.num_points`` uniform points (with ``generator``).
    """
    # float32 whatever the training precision: the assignment must not depend on fp16 rounding.
    class_logits, mask_logits = class_logits.float(), mask_logits.float()
    cost_class = -class_logits.softmax(-1)[:, target_classes]

    coords = random_points(1, cfg.num_points, mask_logits.device, generator)[0]  # (P, 2), shared
    pred_points = point_sample(mask_logits, coords.expand(mask_logits.shape[0], -1, -1))
    tgt = target_masks.to(device=mask_logits.device, dtype=torch.float32)
    tgt_points = point_sample(tgt, coords.expand(tgt.shape[0], -1, -1))
    cost_bce, cost_dice = mask_cost_matrices(pred_points, tgt_points)
    return cfg.cost_class * cost_class + cfg.cost_mask * cost_bce + cfg.cost_dice * cost_dice


@torch.no_grad()
def hungarian_match(
    class_logits: Tensor,
    mask_logits: Tensor,
    targets: list[dict[str, Tensor]],
    cfg: MatcherConfig,
    generator: torch.Generator | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """Per image (pred_indices, target_indices), int64 on CPU, sorted by prediction index.

    class_logits (B, Q, K+1), mask_logits (B, Q, H, W), targets[b] = {"labels": (T,), "masks":
    (T, Ht, Wt)}. Images without targets give empty tensors and draw no random points. The cost
    is computed on the logits' device and solved on CPU.
    """
    indices = []
    for b, target in enumerate(targets):
        labels, masks = target["labels"], target["masks"]
        if masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
            raise ValueError(f"image {b}: masks {tuple(masks.shape)} must be (T, Ht, Wt) for labels {tuple(labels.shape)}")
        if labels.numel() == 0:
            empty = torch.empty(0, dtype=torch.int64)
            indices.append((empty, empty.clone()))
            continue
        cost = match_costs(class_logits[b], mask_logits[b], labels.to(class_logits.device), masks, cfg, generator)
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
    return indices

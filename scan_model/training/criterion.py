"""Set criterion of the segmentation model: class, mask-BCE and dice losses (SPEC.md §3.3).

Every prediction set (the final one and each deep-supervision aux set) is matched to the targets
on its own, then:

* loss_ce: weighted cross-entropy over K+1 logits; unmatched queries target no-object (index K),
  which weighs ``no_object_weight`` so the ~90 unmatched queries do not swamp the matched ones;
* loss_mask / loss_dice: on matched pairs only, at PointRend importance points, summed over masks
  and divided by ``num_masks`` (the batch's mask count, averaged across ranks by the caller).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .matcher import MatcherConfig, hungarian_match
from .points import point_sample, uncertainty_points


@dataclass
class LossConfig:
    """Matcher and criterion weights, point sampling (SPEC §3.3); the recipe's `loss` section."""

    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    deep_supervision: bool = True


@dataclass
class CriterionConfig(LossConfig):
    num_classes: int = 0  # K real classes (the no-object class is index K); taken from the dataset
    matcher: MatcherConfig | None = None  # None: the loss weights and num_points, as the official config

    def __post_init__(self) -> None:
        if self.num_classes < 1:
            raise ValueError(f"num_classes must be at least 1, got {self.num_classes}")
        if self.matcher is None:
            self.matcher = MatcherConfig(self.class_weight, self.mask_weight, self.dice_weight, self.num_points)


def dice_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Sum over masks of 1 - (2|p.t| + 1) / (|p| + |t| + 1), divided by num_masks; inputs (M, P)."""
    prob = logits.sigmoid()
    numerator = 2.0 * (prob * targets).sum(-1)
    denominator = prob.sum(-1) + targets.sum(-1)
    return (1.0 - (numerator + 1.0) / (denominator + 1.0)).sum() / num_masks


def mask_bce_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """BCE-with-logits averaged over points, summed over masks, divided by num_masks; (M, P)."""
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(1).sum() / num_masks


class SetCriterion(nn.Module):
    def __init__(self, cfg: CriterionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        weight = torch.ones(cfg.num_classes + 1)
        weight[-1] = cfg.no_object_weight
        # Same name as the official buffer (SPEC.md §2.6), non-persistent: it is derived from cfg.
        self.register_buffer("empty_weight", weight, persistent=False)

    def forward(
        self,
        predictions: list[dict[str, Tensor]],
        targets: list[dict[str, Tensor]],
        num_masks: float | Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, Tensor]:
        """Unweighted losses: loss_ce/loss_mask/loss_dice for predictions[0], suffix _i for aux set i.

        predictions[k] = {"class_logits": (B, Q, K+1), "mask_logits": (B, Q, H, W)}; targets[b] =
        {"labels": (T,) int64, "masks": (T, Ht, Wt)} at crop resolution.
        """
        if num_masks is None:
            num_masks = sum(int(t["labels"].numel()) for t in targets)
        num_masks = max(float(num_masks), 1.0)

        sets = predictions if self.cfg.deep_supervision else predictions[:1]
        losses: dict[str, Tensor] = {}
        for i, pred in enumerate(sets):
            suffix = "" if i == 0 else f"_{i - 1}"
            set_losses = self._set_losses(pred, targets, num_masks, generator)
            losses.update({name + suffix: value for name, value in set_losses.items()})
        return losses

    def weighted_total(self, losses: dict[str, Tensor]) -> Tensor:
        """class_weight * ce + mask_weight * mask + dice_weight * dice, over every prediction set."""
        weights = {"loss_ce": self.cfg.class_weight, "loss_mask": self.cfg.mask_weight, "loss_dice": self.cfg.dice_weight}
        total = None
        for key, value in losses.items():
            base = key if key in weights else key.rsplit("_", 1)[0]
            term = weights[base] * value
            total = term if total is None else total + term
        if total is None:
            raise ValueError("no losses to sum")
        return total

    def _set_losses(
        self, pred: dict[str, Tensor], targets: list[dict[str, Tensor]], num_masks: float, generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        class_logits, mask_logits = pred["class_logits"], pred["mask_logits"]
        indices = hungarian_match(class_logits, mask_logits, targets, self.cfg.matcher, generator)
        return {
            "loss_ce": self._class_loss(class_logits, targets, indices),
            **self._mask_losses(mask_logits, targets, indices, num_masks, generator),
        }

    def _class_loss(self, class_logits: Tensor, targets: list[dict[str, Tensor]], indices: list[tuple[Tensor, Tensor]]) -> Tensor:
        batch, queries, _ = class_logits.shape
        device = class_logits.device
        target_classes = torch.full((batch, queries), self.cfg.num_classes, dtype=torch.int64, device=device)
        for b, (src, tgt) in enumerate(indices):
            target_classes[b, src.to(device)] = targets[b]["labels"].to(device)[tgt.to(device)]
        # cross_entropy wants classes on dim 1; with weight= it divides by the summed target weights.
        return F.cross_entropy(class_logits.float().transpose(1, 2), target_classes, weight=self.empty_weight)

    def _mask_losses(
        self,
        mask_logits: Tensor,
        targets: list[dict[str, Tensor]],
        indices: list[tuple[Tensor, Tensor]],
        num_masks: float,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        device = mask_logits.device
        src_masks = torch.cat([mask_logits[b, src.to(device)] for b, (src, _) in enumerate(indices)])
        if src_masks.shape[0] == 0:
            # No targets in the batch: zero losses that still belong to the graph (DDP needs every grad).
            zero = mask_logits.sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}

        coords = uncertainty_points(
            src_masks[:, None].detach(),
            self.cfg.num_points,
            self.cfg.oversample_ratio,
            self.cfg.importance_sample_ratio,
            generator,
        )
        point_logits = point_sample(src_masks[:, None], coords)[:, 0].float()
        # Targets per image: crop sizes may differ between images; coords are normalised anyway.
        point_labels, start = [], 0
        for b, (_, tgt) in enumerate(indices):
            if len(tgt) == 0:
                continue
            masks = targets[b]["masks"].to(device)[tgt.to(device)].float()
            point_labels.append(point_sample(masks, coords[start : start + len(tgt)]))
            start += len(tgt)
        point_labels = torch.cat(point_labels).float()
        return {
            "loss_mask": mask_bce_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }

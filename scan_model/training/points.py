"""Point sampling for the training losses (SPEC.md §3.3).

Mask2Former never compares whole masks: the matcher and the mask losses read predictions (1/4
resolution) and targets (crop resolution) at the same normalised points, so neither is resized.
The loss points are PointRend-style: mostly where the prediction is least certain.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def random_points(n: int, num_points: int, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
    """(n, num_points, 2) float32 uniform points in [0, 1) as (x, y).

    Drawn on the generator's device (a CPU generator cannot feed CUDA ``torch.rand``) and then
    moved, so a seeded CPU generator gives the same points whatever device the model is on.
    """
    if generator is None:
        return torch.rand(n, num_points, 2, device=device)
    return torch.rand(n, num_points, 2, generator=generator, device=generator.device).to(device)


def point_sample(inputs: Tensor, coords: Tensor) -> Tensor:
    """Bilinear values of ``inputs`` at normalised points.

    inputs (N, C, H, W) or (N, H, W); coords (N, P, 2) in [0, 1] as (x, y), pixel centres at
    ((x + 0.5) / W, (y + 0.5) / H). Returns (N, C, P) or (N, P). align_corners=False with zero
    padding, as the official ``point_sample``: points within half a pixel of the border blend
    with zeros.
    """
    squeeze_channel = inputs.dim() == 3
    if squeeze_channel:
        inputs = inputs.unsqueeze(1)
    grid = (2.0 * coords.to(inputs.dtype) - 1.0).unsqueeze(2)  # (N, P, 1, 2): a P x 1 "image" of points
    out = F.grid_sample(inputs, grid, mode="bilinear", padding_mode="zeros", align_corners=False).squeeze(3)
    return out.squeeze(1) if squeeze_channel else out


@torch.no_grad()
def uncertainty_points(
    logits: Tensor,
    num_points: int,
    oversample_ratio: float,
    importance_ratio: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """PointRend importance sampling: (N, 1, H, W) logits -> (N, num_points, 2) coords.

    Draws ``int(num_points * oversample_ratio)`` uniform candidates, keeps the
    ``int(importance_ratio * num_points)`` with the highest uncertainty ``-|logit|`` (first, in
    decreasing uncertainty) and appends uniform points up to ``num_points``. The choice carries
    no gradient; the losses sample the logits again at these coords.
    """
    n = logits.shape[0]
    num_sampled = int(num_points * oversample_ratio)
    num_uncertain = int(importance_ratio * num_points)
    if num_sampled < num_uncertain:
        raise ValueError(f"oversample_ratio {oversample_ratio} leaves fewer candidates than the {num_uncertain} kept")
    candidates = random_points(n, num_sampled, logits.device, generator)
    uncertainty = -point_sample(logits, candidates).abs()[:, 0]  # (N, num_sampled)
    top = uncertainty.topk(num_uncertain, dim=1).indices
    chosen = candidates.gather(1, top.unsqueeze(-1).expand(-1, -1, 2))
    extra = random_points(n, num_points - num_uncertain, logits.device, generator)
    return torch.cat([chosen, extra], dim=1)

"""The contrastive objective of the CLIP finetuning (SPEC §4.2): symmetric InfoNCE over every rank.

Each process gathers the image and text features of all processes, keeps its own slice as the
tensor that carries gradients, and computes the loss over the whole global batch, as open_clip's
`ClipLoss` does without `local_loss`. Every rank therefore computes the same loss value, equal to
one process holding the whole batch.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

# The learnable temperature is clamped to [0, ln 100] after every step (SPEC §4.2).
MAX_LOGIT_SCALE = math.log(100.0)


def gather_features(features: Tensor) -> Tensor:
    """(n, E) per rank -> (world * n, E) in rank order; the local slice keeps its gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features
    gathered = [torch.zeros_like(features) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, features.detach().contiguous())
    gathered[dist.get_rank()] = features
    return torch.cat(gathered)


def contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """Symmetric InfoNCE: the mean of image->text and text->image cross-entropies.

    image_features, text_features: (B, E), row i of one matches row i of the other (not yet
    normalised); logit_scale: the log-temperature parameter (scalar), used as exp(logit_scale).
    """
    image = F.normalize(image_features, dim=-1)
    text = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp() * image @ text.t()
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def distributed_contrastive_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """`contrastive_loss` over the features of every rank (the local ones carry the gradient)."""
    return contrastive_loss(gather_features(image_features), gather_features(text_features), logit_scale)


@torch.no_grad()
def clamp_logit_scale(logit_scale: Tensor) -> None:
    logit_scale.clamp_(0.0, MAX_LOGIT_SCALE)

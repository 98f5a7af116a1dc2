"""Fusing the two classifiers and painting the semantic map (SPEC §1.13).

Written on fixed-size tensors (all Q queries, a `valid` flag instead of boolean
indexing) so the same functions serve eager inference and export.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# Added to the probabilities before the log of the log branch (official constant).
_LOG_EPS = 1e-8


def ensemble_class_scores(
    mask_cls_logits: Tensor,
    clip_logits: Tensor,
    valid: Tensor,
    weight: float,
    log_branch: bool = False,
) -> Tensor:
    """Per-query class probabilities from the in-vocabulary and region-CLIP logits.

    Args:
        mask_cls_logits: (Q, K+1) calibrated logits; the last column is the non-object class.
        clip_logits: (Q, K+1) region-CLIP logits for every query (rows of invalid queries
            are ignored, so any finite values will do).
        valid: (Q,) bool, queries whose binary mask is non-empty.
        weight: CLIP ensemble weight w; scores are in^(1-w) * out^w.
        log_branch: the official ADE-847 / PASCAL-Context-459 variant, which spreads the
            in-vocabulary non-object probability back over the classes.
    Returns:
        (Q, K) scores.
    """
    probs = mask_cls_logits.softmax(-1)
    in_vocab = probs[:, :-1]
    # The non-object column is dropped *before* the region softmax (SPEC §8 B13).
    clip_cls = clip_logits[:, :-1].softmax(-1)
    # Queries with an empty mask get probability 1 for every class (official behaviour).
    out_vocab = torch.where(valid[:, None], clip_cls, torch.ones_like(clip_cls))
    scores = in_vocab.pow(1.0 - weight) * out_vocab.pow(weight)
    if not log_branch:
        return scores
    void = probs[:, -1:]
    log_scores = (1.0 - weight) * in_vocab.log() + weight * out_vocab.log()
    with_void = torch.cat([log_scores.softmax(-1) * (1.0 - void), void], dim=-1)
    return torch.log(with_void + _LOG_EPS).softmax(-1)[:, :-1]


def semantic_map(class_scores: Tensor, mask_probs: Tensor) -> Tensor:
    """sum_q scores[q, c] * mask_probs[q]: (Q, K) x (Q, H, W) -> (K, H, W)."""
    return torch.einsum("qc,qhw->chw", class_scores, mask_probs)


def upsample_masks(mask_logits: Tensor, padded_size: tuple[int, int], image_size: tuple[int, int]) -> Tensor:
    """Mask logits (B, Q, h, w) -> bilinear to the padded input size, cropped to the image (SPEC §1.10)."""
    masks = F.interpolate(mask_logits, size=padded_size, mode="bilinear", align_corners=False)
    return masks[..., : image_size[0], : image_size[1]]

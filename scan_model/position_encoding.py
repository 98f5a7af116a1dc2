"""Sine positional encoding of a 2-D feature map (DETR / Mask2Former ``PositionEmbeddingSine``).

Used by the MSDeformAttn pixel decoder and the masked-attention decoder (SPEC.md §1.7), both with
``normalize=True`` and no padding mask. Without a mask the official ``cumsum`` over a map of ones is
just ``1..h`` (and ``1..w``), so it is written here with ``arange`` on (symbolic) sizes: the values are
bit-identical and the graph exports with dynamic H, W.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class PositionEmbeddingSine(nn.Module):
    """(B, C, h, w) feature map -> (B, 2 * num_pos_feats, h, w) positional encoding.

    Channels ``[0, num_pos_feats)`` encode y, the rest x; within each half, channel pairs
    (2i, 2i+1) hold (sin, cos) of ``pos / temperature ** (2i / num_pos_feats)``. With
    ``normalize`` the positions ``1..h`` are rescaled to ``(0, scale]`` by ``/(h + eps) * scale``.
    """

    def __init__(self, num_pos_feats: int = 128, temperature: float = 10000.0, normalize: bool = True,
                 scale: float = 2 * math.pi, eps: float = 1e-6):
        super().__init__()
        self.num_pos_feats = num_pos_feats
        self.normalize = normalize
        self.scale = scale
        self.eps = eps
        # Same float32 arithmetic as the official code; a constant, so a non-persistent buffer
        # (the official state dict has no key for it).
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32)
        dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
        self.register_buffer("dim_t", dim_t, persistent=False)

    def _axis(self, n, device: torch.device) -> Tensor:
        """(n, num_pos_feats) encoding of positions 1..n along one axis."""
        embed = torch.arange(1, n + 1, device=device, dtype=torch.float32)  # == cumsum of ones
        if self.normalize:
            embed = embed / (embed[-1:] + self.eps) * self.scale
        pos = embed[:, None] / self.dim_t
        # Interleave sin of the even and cos of the odd channels: [sin0, cos1, sin2, cos3, ...].
        return torch.stack((pos[:, 0::2].sin(), pos[:, 1::2].cos()), dim=2).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        B, _, h, w = x.shape
        pos_y = self._axis(h, x.device)[:, None, :].expand(h, w, self.num_pos_feats)
        pos_x = self._axis(w, x.device)[None, :, :].expand(h, w, self.num_pos_feats)
        pos = torch.cat((pos_y, pos_x), dim=2).permute(2, 0, 1)
        return pos.unsqueeze(0).expand(B, -1, -1, -1).to(x.dtype)

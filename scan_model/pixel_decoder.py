"""Mask2Former's MSDeformAttn pixel decoder (SCAN's ``sem_seg_head.pixel_decoder``), pure PyTorch.

A 6-layer multi-scale deformable-attention encoder over res3..res5 plus one FPN level for res2,
then a 1x1 conv to the mask features (SPEC.md §1.7). Parameter names match the official state dict
with ``sem_seg_head.pixel_decoder.`` removed (SPEC.md §2.2), so official weights load with
``strict=True``.

Export-friendly by construction (EXPORT_NOTES.md §3.2, rows 2a/2b of §2): spatial shapes come from
``feat.shape[-2:]`` as (symbolic) ints, never from tensors; reference points use ``arange`` instead
of ``linspace``; sampling offsets are normalised per level by dividing by ``w`` and ``h``. The
deformable sampling is the official pure-PyTorch fallback (grid_sample bilinear, zeros padding,
align_corners=False), which matches the CUDA kernel up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .position_encoding import PositionEmbeddingSine

# Which backbone maps feed the deformable encoder (coarsest first) and the extra FPN level.
# Fixed by SCAN's configs (DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES, COMMON_STRIDE 4).
ENCODER_FEATURES = ("res5", "res4", "res3")
FPN_FEATURE = "res2"


@dataclass
class PixelDecoderConfig:
    """Pixel-decoder hyper-parameters; defaults are SCAN's (SPEC.md §1.7)."""

    in_channels: tuple[int, int, int, int] = (128, 256, 512, 1024)  # res2..res5
    conv_dim: int = 256
    mask_dim: int = 256
    num_encoder_layers: int = 6
    num_heads: int = 8
    num_points: int = 4
    ffn_dim: int = 1024  # hard-coded in the official code (msdeformattn.py:306)
    num_groups: int = 32  # GroupNorm


@dataclass
class PixelDecoderOutput:
    mask_features: Tensor  # (B, mask_dim, H/4, W/4)
    multi_scale_features: list[Tensor]  # 3 maps, coarsest first: res5-, res4-, res3-level (B, conv_dim, h, w)
    encoder_tokens: Tensor  # (B, sum h*w, conv_dim), levels res5, res4, res3 concatenated


def ms_deform_attn_sample(value: Tensor, shapes: list[tuple], sampling_locations: Tensor,
                          attention_weights: Tensor) -> Tensor:
    """Multi-scale deformable attention core (bilinear sampling + weighted sum over levels and points).

    Args:
        value: (B, S, M, D) per-head values of all levels concatenated, S = sum(h * w).
        shapes: [(h, w)] per level, in the order the levels are concatenated in ``value``.
        sampling_locations: (B, Lq, M, L, P, 2) normalised (x, y) in [0, 1]; outside reads zeros.
        attention_weights: (B, Lq, M, L, P), already softmax-normalised over (L, P).
    Returns:
        (B, Lq, M * D).
    """
    B, _, M, D = value.shape
    _, Lq, _, L, P, _ = sampling_locations.shape
    values = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample coordinates, align_corners=False
    weights = attention_weights.transpose(1, 2).reshape(B * M, 1, Lq, L, P)
    out = None
    # Level by level: each (B*M, D, Lq, P) sample is weighted and reduced before the next one is
    # drawn, instead of stacking all levels into one (B*M, D, Lq, L*P) array (100 MB for Swin-B
    # at 640x640) that is then copied, multiplied and summed. Same products, summed per level.
    for level, (h, w) in enumerate(shapes):
        v = values[level].flatten(2).transpose(1, 2).reshape(B * M, D, h, w)
        grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)  # (B*M, Lq, P, 2)
        sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        term = (sampled * weights[..., level, :]).sum(-1)  # (B*M, D, Lq)
        out = term if out is None else out + term
    return out.view(B, M * D, Lq).transpose(1, 2)


def reference_points(shapes: list[tuple], device: torch.device) -> Tensor:
    """(S, 2) pixel-centre (x, y) of every token of every level, normalised to (0, 1).

    ``(arange(h) + 0.5) / h`` equals the official ``linspace(0.5, h - 0.5, h) / h`` exactly, and the
    valid ratios are 1 because there is no padding mask (SPEC.md §1.7).
    """
    points = []
    for h, w in shapes:
        ys = (torch.arange(h, device=device, dtype=torch.float32) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=torch.float32) + 0.5) / w
        grid = torch.stack((xs[None, :].expand(h, w), ys[:, None].expand(h, w)), dim=-1)
        points.append(grid.reshape(-1, 2))
    return torch.cat(points, dim=0)


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention (Deformable DETR), offsets/weights from the query."""

    def __init__(self, dim: int, num_heads: int, num_levels: int, num_points: int):
        super().__init__()
        self.num_heads, self.num_levels, self.num_points = num_heads, num_levels, num_points
        self.sampling_offsets = nn.Linear(dim, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(dim, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Deformable-DETR init: offsets start on a ring of directions, one per head, scaled by point index."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], dim=-1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid = grid * torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(self, query: Tensor, ref_points: Tensor, value_input: Tensor, shapes: list[tuple]) -> Tensor:
        """query: (B, Lq, C); ref_points: (B or 1, Lq, 2) normalised (x, y); value_input: (B, S, C) -> (B, Lq, C)."""
        B, Lq, C = query.shape
        M, L, P = self.num_heads, self.num_levels, self.num_points
        value = self.value_proj(value_input).view(B, -1, M, C // M)
        offsets = self.sampling_offsets(query).view(B, Lq, M, L, P, 2)
        weights = self.attention_weights(query).view(B, Lq, M, L * P).softmax(-1).view(B, Lq, M, L, P)
        # Offsets are in pixels of each level: divide x by that level's w and y by its h
        # (the official code divides by a tensor built from the shapes; same floats).
        ref = ref_points[:, :, None, None, :]
        locations = torch.stack(
            [ref + torch.stack((offsets[:, :, :, lv, :, 0] / w, offsets[:, :, :, lv, :, 1] / h), dim=-1)
             for lv, (h, w) in enumerate(shapes)],
            dim=3,
        )
        return self.output_proj(ms_deform_attn_sample(value, shapes, locations, weights))


class DeformableEncoderLayer(nn.Module):
    """Post-norm layer: src = LN1(src + MSDA(src + pos, values=src)); src = LN2(src + FFN(src)). Dropout 0."""

    def __init__(self, dim: int, ffn_dim: int, num_heads: int, num_levels: int, num_points: int):
        super().__init__()
        self.self_attn = MSDeformAttn(dim, num_heads, num_levels, num_points)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src: Tensor, pos: Tensor, ref_points: Tensor, shapes: list[tuple]) -> Tensor:
        src = self.norm1(src + self.self_attn(src + pos, ref_points, src, shapes))
        return self.norm2(src + self.linear2(F.relu(self.linear1(src))))


class DeformableEncoderStack(nn.Module):
    """The layer stack (official ``transformer.encoder``)."""

    def __init__(self, layers: list[DeformableEncoderLayer]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, src: Tensor, pos: Tensor, ref_points: Tensor, shapes: list[tuple]) -> Tensor:
        for layer in self.layers:
            src = layer(src, pos, ref_points, shapes)
        return src


class DeformableEncoder(nn.Module):
    """Flattens the levels, adds the level embedding to the positional encoding, runs the stack
    (official ``MSDeformAttnTransformerEncoderOnly``, ``transformer.*``)."""

    def __init__(self, dim: int, ffn_dim: int, num_layers: int, num_heads: int, num_levels: int, num_points: int):
        super().__init__()
        self.level_embed = nn.Parameter(torch.empty(num_levels, dim))
        self.encoder = DeformableEncoderStack(
            [DeformableEncoderLayer(dim, ffn_dim, num_heads, num_levels, num_points) for _ in range(num_layers)]
        )
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    def forward(self, srcs: list[Tensor], pos_embeds: list[Tensor]) -> tuple[Tensor, list[tuple]]:
        """srcs, pos_embeds: per level (B, C, h, w). Returns tokens (B, S, C) and the [(h, w)] shapes."""
        shapes = [(s.shape[-2], s.shape[-1]) for s in srcs]
        src = torch.cat([s.flatten(2).transpose(1, 2) for s in srcs], dim=1)
        pos = torch.cat(
            [p.flatten(2).transpose(1, 2) + self.level_embed[lv].view(1, 1, -1) for lv, p in enumerate(pos_embeds)],
            dim=1,
        )
        ref = reference_points(shapes, src.device).to(src.dtype)[None]
        return self.encoder(src, pos, ref, shapes), shapes


class ConvNorm(nn.Conv2d):
    """detectron2-style ``Conv2d`` with a ``norm`` submodule (keys ``weight``, ``norm.*``) and optional ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int, num_groups: int, relu: bool):
        super().__init__(in_ch, out_ch, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.GroupNorm(num_groups, out_ch)
        self.relu = relu
        c2_xavier_fill(self)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(super().forward(x))
        return F.relu(x) if self.relu else x


def c2_xavier_fill(module: nn.Conv2d) -> None:
    """Caffe2 "XavierFill": kaiming-uniform with a=1 (uniform, fan_in), zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


class MSDeformAttnPixelDecoder(nn.Module):
    """Backbone res2..res5 -> mask features (stride 4) + three encoder maps (strides 32, 16, 8)."""

    def __init__(self, cfg: PixelDecoderConfig):
        super().__init__()
        self.cfg = cfg
        d, G = cfg.conv_dim, cfg.num_groups
        res2_ch, res3_ch, res4_ch, res5_ch = cfg.in_channels
        # Index 0 = res5 (coarsest), as in the official ``input_proj``.
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, d, kernel_size=1), nn.GroupNorm(G, d)) for c in (res5_ch, res4_ch, res3_ch)
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.zeros_(proj[0].bias)
        self.pe_layer = PositionEmbeddingSine(d // 2, normalize=True)
        self.transformer = DeformableEncoder(d, cfg.ffn_dim, cfg.num_encoder_layers, cfg.num_heads,
                                             len(ENCODER_FEATURES), cfg.num_points)
        # Extra FPN level for res2 (stride 4); "_1" suffix as in the official names.
        self.adapter_1 = ConvNorm(res2_ch, d, 1, G, relu=False)
        self.layer_1 = ConvNorm(d, d, 3, G, relu=True)
        self.mask_features = nn.Conv2d(d, cfg.mask_dim, kernel_size=1)
        c2_xavier_fill(self.mask_features)

    def forward(self, features: dict[str, Tensor]) -> PixelDecoderOutput:
        """features: {"res2": (B, C2, H/4, W/4), ..., "res5": (B, C5, H/32, W/32)} NCHW."""
        srcs, pos = [], []
        for proj, name in zip(self.input_proj, ENCODER_FEATURES):
            x = features[name]
            srcs.append(proj(x))
            pos.append(self.pe_layer(x))
        tokens, shapes = self.transformer(srcs, pos)

        B, _, C = tokens.shape
        maps = [
            t.transpose(1, 2).reshape(B, C, h, w)
            for t, (h, w) in zip(tokens.split([h * w for h, w in shapes], dim=1), shapes)
        ]
        lateral = self.adapter_1(features[FPN_FEATURE])
        fused = lateral + F.interpolate(maps[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        fpn = self.layer_1(fused)
        return PixelDecoderOutput(mask_features=self.mask_features(fpn), multi_scale_features=maps,
                                  encoder_tokens=tokens)

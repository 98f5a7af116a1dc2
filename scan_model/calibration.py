"""SCAN's semantic calibration ("Semantic Integration Module", SPEC.md §1.4-§1.8).

The Mask2Former query embeddings are calibrated with the frozen original CLIP:

1. ``clip_context``: patch tokens of three tapped CLIP layers go through the shared frequency module
   (LFM, one Gaussian sigma per layer), are concatenated along the token axis and projected by a
   two-layer linear MLP -> ``ori_clip_hw_feature`` (B, 3*G*G, E).
2. ``fusion``: five residual cross-attention blocks of the queries over that context.
3. the L2-normalised global CLIP embedding, scaled by a learnable scalar, is added to every query.
4. ``refiner``: a 5-layer ``nn.TransformerEncoder`` applied to each query as its own length-1 sequence.

Module names match the official state dict through ``OFFICIAL_PREFIXES`` so official weights load
with ``strict=True``. The FFT of the official LFM is written as constant DFT matrix products
(EXPORT_NOTES.md §3.1) because neither the ONNX->TensorRT path nor TensorRT-RTX can run DFT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Official state-dict prefix -> our prefix (the key "learnable_weight" maps to the key "cls_weight").
OFFICIAL_PREFIXES = {
    "LFM.": "lfm.",
    "oriclip_mlp.": "clip_mlp.",
    "fusion_decoder.": "fusion.",
    "lightweight_transformer.": "refiner.",
    "learnable_weight": "cls_weight",
}


@dataclass
class CalibrationConfig:
    """Hyper-parameters of the calibration modules; defaults are the ViT-B config (SPEC.md §1.1)."""

    clip_width: int = 768  # CLIP_VISION_DIM: channels of the tapped CLIP tokens (LFM channels)
    embed_dim: int = 512  # SCAN_DIM: query / CLIP joint embedding width
    grid_size: int = 14  # side of the CLIP token grid (official key MODEL.PATCH_SIZE, a misnomer)
    sigmas: tuple[float, ...] = (9.0, 7.0, 3.0)  # FREQUENCY_SIGMA, one per tapped CLIP layer, in order
    fusion_blocks: int = 5
    fusion_heads: int = 8
    refiner_layers: int = 5
    refiner_heads: int = 8
    refiner_ffn_dim: int = 2048  # PyTorch default, hard-coded in the official code whatever SCAN_DIM is
    refiner_dropout: float = 0.1  # PyTorch default of TransformerEncoderLayer; active in training only
    cls_weight_init: float = 0.1


def dft_matrices(size: int) -> tuple[Tensor, Tensor]:
    """cos(2*pi*k*n/size) and sin(2*pi*k*n/size), both (size, size) and symmetric, in float32.

    Built in float64 (with k*n reduced mod size, so the angle stays small) and then rounded once.
    """
    k = torch.arange(size, dtype=torch.float64)
    angle = (2.0 * math.pi / size) * torch.remainder(k[:, None] * k[None, :], size)
    return torch.cos(angle).float(), torch.sin(angle).float()


def spectral_weight(size: int, sigma: float) -> Tensor:
    """(size, size) float32 weight 1 - exp(-((y - c)^2 + (x - c)^2) / (2 sigma^2)), c = size // 2.

    It multiplies the *unshifted* fft2 spectrum (SPEC.md §1.4 step 3, §8 B1): the Gaussian sits on the
    Nyquist corner, so despite the official name ``high_filter`` this keeps low frequencies.
    """
    ys = torch.arange(size, dtype=torch.float64)
    centre = size // 2
    dist2 = (ys[:, None] - centre) ** 2 + (ys[None, :] - centre) ** 2
    return (1.0 - torch.exp(-dist2 / (2.0 * sigma**2))).float()


class FrequencyModule(nn.Module):
    """LFM (official ``scan/frequency.py::LFM``): spectral 1x1-conv filtering with a residual.

    y = Re(ifft2(conv2(relu(conv1([Re F; Im F]))))) with F = fft2(x) * (1 - g_sigma), output x + y.
    One instance is shared by all tapped layers; ``scale_index`` picks the sigma. Computed in fp32, as
    the official code does (sums over G*G large residual-stream values can overflow fp16): in a half
    model keep this module fp32 (``model.half(); model.lfm.float()``); it casts its input up and back.
    """

    def __init__(self, channels: int, grid_size: int, sigmas: Sequence[float]):
        super().__init__()
        self.grid_size = grid_size
        self.conv1 = nn.Conv2d(2 * channels, 2 * channels, 1)
        self.conv2 = nn.Conv2d(2 * channels, 2 * channels, 1)
        cos, sin = dft_matrices(grid_size)
        # Constants derived from the config, absent from the official state dict -> non-persistent.
        self.register_buffer("dft_cos", cos, persistent=False)
        self.register_buffer("dft_sin", sin, persistent=False)
        weights = torch.stack([spectral_weight(grid_size, s) for s in sigmas])  # (S, G, G)
        self.register_buffer("spectral_weights", weights, persistent=False)

    def forward(self, x: Tensor, scale_index: int) -> Tensor:
        """x: (B, C, G, G) token grid (row r, column c = token r*G + c) -> (B, C, G, G), dtype of x."""
        h = x.float()
        cos, sin = self.dft_cos, self.dft_sin
        # fft2 with F = cos - i*sin (symmetric): F X F = (C X C - S X S) - i (S X C + C X S).
        xc, xs = h @ cos, h @ sin
        real = cos @ xc - sin @ xs
        imag = -(sin @ xc + cos @ xs)
        weight = self.spectral_weights[scale_index]
        z = torch.cat([real * weight, imag * weight], dim=1)  # (B, 2C, G, G): real channels first
        z = self.conv2(F.relu(self.conv1(z)))
        zr, zi = z.chunk(2, dim=1)
        # Re(ifft2(Zr + i Zi)) with conj(F) = cos + i*sin: (C (Zr C - Zi S) - S (Zr S + Zi C)) / G^2.
        # Only the real part is kept, like the official complex -> ``.float()`` cast (SPEC.md §1.4 step 5).
        y = (cos @ (zr @ cos - zi @ sin) - sin @ (zr @ sin + zi @ cos)) / (self.grid_size * self.grid_size)
        return (h + y).to(x.dtype)


class ClipFeatureMLP(nn.Module):
    """Official ``oriclip_mlp``: Linear(C -> E) then Linear(E -> E), no activation in between (SPEC.md §1.5)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, out_dim)
        self.fc2 = nn.Linear(out_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        """x: (..., C) -> (..., E)."""
        return self.fc2(self.fc1(x))


class FusionDecoder(nn.Module):
    """Official ``fusion_decoder`` ("CA", SPEC.md §1.8 step 1): residual cross-attention of the queries
    over the CLIP context, no positional encoding, no FFN; a LayerNorm after every block but the last.
    """

    def __init__(self, dim: int, heads: int, blocks: int):
        super().__init__()
        self.multiattn = nn.ModuleList(nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(blocks))
        self.ln = nn.ModuleList(nn.LayerNorm(dim) for _ in range(blocks - 1))

    def forward(self, queries: Tensor, context: Tensor) -> Tensor:
        """queries: (B, Q, E); context: (B, T, E) -> (B, Q, E)."""
        x = queries
        for i, attn in enumerate(self.multiattn):
            x = x + attn(x, context, context, need_weights=False)[0]
            if i < len(self.ln):
                x = self.ln[i](x)
        return x


class SemanticCalibration(nn.Module):
    """Calibrates Mask2Former query embeddings with the original CLIP (SPEC.md §1.4-§1.8).

    Children (official name): ``lfm`` (``LFM``), ``clip_mlp`` (``oriclip_mlp``), ``fusion``
    (``fusion_decoder``), ``refiner`` (``lightweight_transformer``), ``cls_weight`` (``learnable_weight``).
    The number of queries is free (the official code hard-codes 100, SPEC.md §8 B7).
    """

    def __init__(self, cfg: CalibrationConfig | None = None):
        super().__init__()
        cfg = cfg or CalibrationConfig()
        self.cfg = cfg
        self.lfm = FrequencyModule(cfg.clip_width, cfg.grid_size, cfg.sigmas)
        self.clip_mlp = ClipFeatureMLP(cfg.clip_width, cfg.embed_dim)
        self.fusion = FusionDecoder(cfg.embed_dim, cfg.fusion_heads, cfg.fusion_blocks)
        layer = nn.TransformerEncoderLayer(
            cfg.embed_dim,
            cfg.refiner_heads,
            dim_feedforward=cfg.refiner_ffn_dim,
            dropout=cfg.refiner_dropout,
            batch_first=True,
        )
        # Nested tensors only matter with padding masks; off keeps eager and export on one code path.
        self.refiner = nn.TransformerEncoder(layer, cfg.refiner_layers, enable_nested_tensor=False)
        self.cls_weight = nn.Parameter(torch.full((1,), cfg.cls_weight_init))

    def clip_context(self, layer_tokens: Sequence[Tensor]) -> Tensor:
        """Official ``ori_clip_hw_feature``.

        layer_tokens: one (B, G*G, C) tensor per sigma (patch tokens of the tapped CLIP layers, CLS
        excluded, batch-first, row-major grid order). Returns (B, S*G*G, E), scale-major then row-major.
        """
        assert len(layer_tokens) == len(self.cfg.sigmas), "one token tensor per sigma"
        g = self.cfg.grid_size
        grids = []
        for j, tokens in enumerate(layer_tokens):
            batch, _, channels = tokens.shape
            grid = tokens.transpose(1, 2).reshape(batch, channels, g, g)  # token t = r*G + c -> grid[r, c]
            grids.append(self.lfm(grid, j).flatten(2).transpose(1, 2))  # back to (B, G*G, C)
        return self.clip_mlp(torch.cat(grids, dim=1))

    def add_global_embedding(self, queries: Tensor, global_cls: Tensor) -> Tensor:
        """queries (B, Q, E) + cls_weight * normalize(global_cls) (B, E), broadcast to every query (§1.8 step 4)."""
        return queries + self.cls_weight * F.normalize(global_cls, dim=-1).unsqueeze(1)

    def refine(self, queries: Tensor) -> Tensor:
        """Official ``lightweight_transformer`` on each query as its own length-1 sequence (§1.8 step 5, §8 B2).

        queries: (B, Q, E) -> (B, Q, E). Queries do not interact here.
        """
        return self.refiner(queries.reshape(-1, 1, queries.shape[-1])).reshape(queries.shape)

    def forward(self, query_embeddings: Tensor, layer_tokens: Sequence[Tensor], global_cls: Tensor) -> Tensor:
        """Refine the decoder's query embeddings.

        query_embeddings: (B, Q, E) from the mask decoder (any Q).
        layer_tokens: S tensors (B, G*G, C), see ``clip_context``.
        global_cls: (B, E) the original CLIP's final projected CLS token, not normalised.
        Returns (B, Q, E), not L2-normalised (the caller normalises and forms 100 * cosine logits).
        """
        return self.calibrate(query_embeddings, self.clip_context(layer_tokens), global_cls)

    def calibrate(self, query_embeddings: Tensor, context: Tensor, global_cls: Tensor) -> Tensor:
        """`forward` with the CLIP context already computed (it depends on the image only).

        context: (B, S*G*G, E) from ``clip_context``; the other arguments as in ``forward``.
        """
        fused = self.fusion(query_embeddings, context)
        return self.refine(self.add_global_embedding(fused, global_cls))

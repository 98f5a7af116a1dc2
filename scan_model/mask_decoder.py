"""Mask2Former masked-attention decoder with SCAN's open-vocabulary query head (``sem_seg_head.predictor``).

100 learnable queries attend, layer by layer, to the pixel decoder's three multi-scale maps (level
``i % 3`` in layer i, coarsest first), each cross-attention restricted to the foreground of the
previous prediction's masks. The "class" head is an MLP to the CLIP embedding space instead of class
logits (SPEC.md §1.7). Parameter names match the official state dict with ``sem_seg_head.predictor.``
removed (SPEC.md §2.3), so official weights load with ``strict=True``.

Quirk kept from the official code: ``num_layers`` is DEC_LAYERS *without* the usual -1
(fixtures/README.md, "Official-code surprises"), so scan_vit{B,L}.yaml build 10 layers and the
decoder makes 1 + num_layers predictions.

Export-friendly (EXPORT_NOTES.md §3.3, rows 3a/3b of §2): fully blocked attention rows are unblocked
with ``m & ~m.all(-1, keepdim=True)`` instead of the official NonZero/index_put, and every size comes
from tensor shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .position_encoding import PositionEmbeddingSine

NUM_FEATURE_LEVELS = 3


@dataclass
class MaskDecoderConfig:
    """Decoder hyper-parameters; defaults are scan_vitB.yaml (SPEC.md §1.1, §1.7)."""

    in_channels: int = 256
    hidden_dim: int = 256
    num_queries: int = 100
    num_heads: int = 8
    ffn_dim: int = 2048
    num_layers: int = 10  # DEC_LAYERS as given, no -1 (official quirk)
    mask_dim: int = 256
    embed_dim: int = 512  # EMBEDDING_DIM = SCAN_DIM (768 for ViT-L)
    embed_hidden_dim: int = 1024
    embed_layers: int = 2


@dataclass
class MaskPrediction:
    query_embeddings: Tensor  # (B, Q, embed_dim) output of the class_embed MLP (NOT normalised)
    mask_logits: Tensor  # (B, Q, H/4, W/4)


@dataclass
class MaskDecoderOutput:
    query_embeddings: Tensor  # (B, Q, embed_dim), after the last layer
    mask_logits: Tensor  # (B, Q, H/4, W/4), after the last layer
    aux: list[MaskPrediction]  # num_layers earlier predictions: aux[0] on the initial queries, aux[j] after layer j


def unblock_full_rows(blocked: Tensor) -> Tensor:
    """Let a query attend everywhere when its mask blocks every key (it would get NaNs otherwise).

    Same result as the official ``m[torch.where(m.sum(-1) == m.shape[-1])] = False``, without
    NonZero/ScatterND (EXPORT_NOTES.md §3.3).
    """
    return blocked & ~blocked.all(-1, keepdim=True)


class MLP(nn.Module):
    """``num_layers`` Linear layers with ReLU between them (keys ``layers.{i}``)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def _xavier_matrices(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class SelfAttentionLayer(nn.Module):
    """tgt = LN(tgt + SelfAttn(q=k=tgt+query_pos, v=tgt)), post-norm, dropout 0."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        _xavier_matrices(self)

    def forward(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        q = tgt + query_pos
        # need_weights left at its default (True) on purpose: it selects the explicit
        # baddbmm/softmax/bmm path the official call takes, not the fused SDPA kernel.
        return self.norm(tgt + self.self_attn(q, q, tgt)[0])


class CrossAttentionLayer(nn.Module):
    """tgt = LN(tgt + MaskedCrossAttn(q=tgt+query_pos, k=memory+pos, v=memory)), post-norm, dropout 0."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        _xavier_matrices(self)

    def forward(self, tgt: Tensor, memory: Tensor, blocked: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        """tgt: (B, Q, C); memory, pos: (B, S, C); blocked: (B*heads, Q, S) bool, True = may not attend."""
        out = self.multihead_attn(tgt + query_pos, memory + pos, memory, attn_mask=blocked)[0]
        return self.norm(tgt + out)


class FFNLayer(nn.Module):
    """tgt = LN(tgt + W2 ReLU(W1 tgt)), post-norm, dropout 0."""

    def __init__(self, dim: int, ffn_dim: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn_dim)
        self.linear2 = nn.Linear(ffn_dim, dim)
        self.norm = nn.LayerNorm(dim)
        _xavier_matrices(self)

    def forward(self, tgt: Tensor) -> Tensor:
        return self.norm(tgt + self.linear2(F.relu(self.linear1(tgt))))


class OpenVocabMaskDecoder(nn.Module):
    """Multi-scale features + mask features -> per-query CLIP-space embeddings and mask logits."""

    def __init__(self, cfg: MaskDecoderConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_dim
        self.num_heads = cfg.num_heads
        self.pe_layer = PositionEmbeddingSine(d // 2, normalize=True)
        self.transformer_self_attention_layers = nn.ModuleList(
            SelfAttentionLayer(d, cfg.num_heads) for _ in range(cfg.num_layers))
        self.transformer_cross_attention_layers = nn.ModuleList(
            CrossAttentionLayer(d, cfg.num_heads) for _ in range(cfg.num_layers))
        self.transformer_ffn_layers = nn.ModuleList(FFNLayer(d, cfg.ffn_dim) for _ in range(cfg.num_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.query_feat = nn.Embedding(cfg.num_queries, d)  # initial query features (tgt)
        self.query_embed = nn.Embedding(cfg.num_queries, d)  # query positional embedding
        self.level_embed = nn.Embedding(NUM_FEATURE_LEVELS, d)
        # Identity (an empty Sequential, no state-dict keys) unless the channels differ, as officially.
        self.input_proj = nn.ModuleList()
        for _ in range(NUM_FEATURE_LEVELS):
            if cfg.in_channels != d:
                conv = nn.Conv2d(cfg.in_channels, d, kernel_size=1)
                nn.init.kaiming_uniform_(conv.weight, a=1)  # c2_xavier_fill
                nn.init.zeros_(conv.bias)
                self.input_proj.append(conv)
            else:
                self.input_proj.append(nn.Sequential())
        self.class_embed = MLP(d, cfg.embed_hidden_dim, cfg.embed_dim, cfg.embed_layers)
        self.mask_embed = MLP(d, d, cfg.mask_dim, 3)

    def _predict(self, tgt: Tensor, mask_features: Tensor, next_size: tuple | None
                 ) -> tuple[MaskPrediction, Tensor | None]:
        """Prediction head on queries tgt (B, Q, C); also the attention mask for a next level of size
        ``next_size`` = (h, w): (B*heads, Q, h*w) bool, True = blocked (mask probability < 0.5)."""
        out = self.decoder_norm(tgt)
        embeddings = self.class_embed(out)
        mask_logits = torch.einsum("bqc,bchw->bqhw", self.mask_embed(out), mask_features)
        if next_size is None:  # after the last layer the official mask is computed but unused
            return MaskPrediction(embeddings, mask_logits), None
        resized = F.interpolate(mask_logits, size=next_size, mode="bilinear", align_corners=False)
        blocked = resized.sigmoid().flatten(2) < 0.5  # (B, Q, h*w)
        # Unblocking per (B, Q) row before repeating per head is the same as after (rows are copies).
        blocked = unblock_full_rows(blocked)
        B, Q, S = blocked.shape
        blocked = blocked.unsqueeze(1).expand(B, self.num_heads, Q, S).reshape(B * self.num_heads, Q, S)
        return MaskPrediction(embeddings, mask_logits), blocked.detach()

    def forward(self, multi_scale_features: list[Tensor], mask_features: Tensor) -> MaskDecoderOutput:
        """multi_scale_features: 3 maps (B, in_channels, h_l, w_l), coarsest first;
        mask_features: (B, mask_dim, H/4, W/4)."""
        sizes, memory, pos = [], [], []
        for lv, x in enumerate(multi_scale_features[:NUM_FEATURE_LEVELS]):
            sizes.append((x.shape[-2], x.shape[-1]))
            pos.append(self.pe_layer(x).flatten(2).transpose(1, 2))  # (B, h*w, C)
            src = self.input_proj[lv](x).flatten(2) + self.level_embed.weight[lv][None, :, None]
            memory.append(src.transpose(1, 2))
        B = mask_features.shape[0]
        query_pos = self.query_embed.weight.unsqueeze(0).expand(B, -1, -1)
        tgt = self.query_feat.weight.unsqueeze(0).expand(B, -1, -1)

        predictions = []
        pred, blocked = self._predict(tgt, mask_features, sizes[0])
        predictions.append(pred)
        num_layers = self.cfg.num_layers
        for i in range(num_layers):
            lv = i % NUM_FEATURE_LEVELS
            tgt = self.transformer_cross_attention_layers[i](tgt, memory[lv], blocked, pos[lv], query_pos)
            tgt = self.transformer_self_attention_layers[i](tgt, query_pos)
            tgt = self.transformer_ffn_layers[i](tgt)
            next_size = sizes[(i + 1) % NUM_FEATURE_LEVELS] if i < num_layers - 1 else None
            pred, blocked = self._predict(tgt, mask_features, next_size)
            predictions.append(pred)
        last = predictions[-1]
        return MaskDecoderOutput(last.query_embeddings, last.mask_logits, aux=predictions[:-1])

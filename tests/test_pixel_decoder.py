"""MSDeformAttn pixel decoder: official-fixture parity, layout, deformable sampling, positional encoding."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from scan_model.pixel_decoder import (
    MSDeformAttn,
    MSDeformAttnPixelDecoder,
    PixelDecoderConfig,
    reference_points,
)
from scan_model.position_encoding import PositionEmbeddingSine
from conftest import REL_TOL, rel_diff

PREFIX = "sem_seg_head.pixel_decoder."
# Tiny fixture config (fixtures/README.md): CONVS_DIM 64, MASK_DIM 64, 2 encoder layers, 8 heads, 4 points.
FIXTURE_CFG = PixelDecoderConfig(in_channels=(32, 64, 128, 256), conv_dim=64, mask_dim=64, num_encoder_layers=2,
                                 num_heads=8, num_points=4, ffn_dim=1024, num_groups=32)


def test_fixture_parity(official_dev):
    torch.manual_seed(0)
    model = MSDeformAttnPixelDecoder(FIXTURE_CFG).eval()
    model.load_state_dict(official_dev.sub_state_dict(PREFIX), strict=True)
    ex = official_dev.expected
    with torch.no_grad():
        out = model({f"res{i}": ex[f"backbone.res{i}"] for i in range(2, 6)})

    diffs = {"encoder_output": rel_diff(out.encoder_tokens, ex["pixel_decoder.encoder_output"]),
             "mask_features": rel_diff(out.mask_features, ex["pixel_decoder.mask_features"])}
    for i, feat in enumerate(out.multi_scale_features):
        diffs[f"multi_scale_features.{i}"] = rel_diff(feat, ex[f"pixel_decoder.multi_scale_features.{i}"])
    print("\npixel decoder rel_diff:", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert len(out.multi_scale_features) == 3
    assert all(v <= REL_TOL for v in diffs.values()), diffs


def test_state_dict_layout_matches_official_vitB(fixtures_root):
    """Default config = scan_vitB.yaml pixel decoder: same key names and shapes as the official model."""
    keys = json.loads((fixtures_root / "keys_vitB.json").read_text())["keys"]
    official = {k[len(PREFIX):]: tuple(v["shape"]) for k, v in keys.items() if k.startswith(PREFIX)}
    ours = {k: tuple(v.shape) for k, v in MSDeformAttnPixelDecoder(PixelDecoderConfig()).state_dict().items()}
    assert ours == official


def _official_style_msdeform(attn: MSDeformAttn, query, value_input, shapes):
    """Deformable attention written the straightforward (official) way: linspace reference points,
    a normaliser tensor built from the shapes, one grid_sample per level and head.
    Returns the output (B, Lq, C) and the sampling locations (B, Lq, M, L, P, 2)."""
    B, Lq, C = query.shape
    M, L, P = attn.num_heads, attn.num_levels, attn.num_points
    D = C // M
    refs = []
    for h, w in shapes:
        ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h), torch.linspace(0.5, w - 0.5, w), indexing="ij")
        refs.append(torch.stack((rx.reshape(-1) / w, ry.reshape(-1) / h), -1))
    ref = torch.cat(refs)[None]  # (1, Lq, 2)
    value = attn.value_proj(value_input).view(B, -1, M, D)
    offsets = attn.sampling_offsets(query).view(B, Lq, M, L, P, 2)
    weights = attn.attention_weights(query).view(B, Lq, M, L * P).softmax(-1).view(B, Lq, M, L, P)
    normaliser = torch.tensor([[w, h] for h, w in shapes], dtype=torch.float32)
    loc = ref[:, :, None, None, None, :] + offsets / normaliser[None, None, None, :, None, :]
    out = torch.zeros(B, Lq, M, D)
    start = 0
    for lv, (h, w) in enumerate(shapes):
        for m in range(M):
            v = value[:, start:start + h * w, m, :].transpose(1, 2).reshape(B, D, h, w)
            grid = 2 * loc[:, :, m, lv] - 1  # (B, Lq, P, 2)
            sampled = F.grid_sample(v, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            out[:, :, m, :] += (sampled * weights[:, None, :, m, lv, :]).sum(-1).transpose(1, 2)
        start += h * w
    return attn.output_proj(out.reshape(B, Lq, C)), loc


def test_deformable_sampling_matches_per_level_grid_sample():
    """Non-square levels of unrelated sizes, random offsets that reach outside the maps (zero padding)."""
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 7), (9, 5), (2, 11)]
    B, C = 2, 32
    attn = MSDeformAttn(C, num_heads=4, num_levels=3, num_points=2)
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        attn.sampling_offsets.bias.mul_(6.0)  # offsets of several pixels, some beyond the border
    S = sum(h * w for h, w in shapes)
    query = torch.randn(B, S, C, generator=g)
    value_input = torch.randn(B, S, C, generator=g)

    ref = reference_points(shapes, query.device)[None]
    with torch.no_grad():
        ours = attn(query, ref, value_input, shapes)
        expected, locations = _official_style_msdeform(attn, query, value_input, shapes)
    assert ((locations < 0) | (locations > 1)).any(), "no sample falls outside the maps"
    diff = rel_diff(ours, expected)
    print(f"\nMSDeformAttn vs per-level grid_sample: rel_diff {diff:.2e}")
    assert diff <= 1e-5


def test_reference_points_equal_linspace_form():
    shapes = [(3, 8), (6, 16)]
    ours = reference_points(shapes, torch.device("cpu"))
    expected = []
    for h, w in shapes:
        ry, rx = torch.meshgrid(torch.linspace(0.5, h - 0.5, h), torch.linspace(0.5, w - 0.5, w), indexing="ij")
        expected.append(torch.stack((rx.reshape(-1) / w, ry.reshape(-1) / h), -1))
    assert torch.equal(ours, torch.cat(expected))


def test_sine_position_encoding_equals_cumsum_form():
    """arange-based encoding is bit-identical to the official masked-cumsum form (no padding)."""
    x = torch.zeros(2, 3, 5, 7)
    F_, scale, eps = 16, 2 * math.pi, 1e-6
    not_mask = torch.ones(2, 5, 7)
    y_embed = not_mask.cumsum(1, dtype=torch.float32)
    x_embed = not_mask.cumsum(2, dtype=torch.float32)
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * scale
    dim_t = torch.arange(F_, dtype=torch.float32)
    dim_t = 10000 ** (2 * (dim_t // 2) / F_)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[..., 0::2].sin(), pos_x[..., 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[..., 0::2].sin(), pos_y[..., 1::2].cos()), dim=4).flatten(3)
    expected = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
    assert torch.equal(PositionEmbeddingSine(F_)(x), expected)


def test_training_init_is_deformable_detr_style():
    torch.manual_seed(0)
    attn = MSDeformAttn(32, num_heads=8, num_levels=3, num_points=4)
    assert attn.sampling_offsets.weight.abs().sum() == 0
    assert attn.attention_weights.weight.abs().sum() == 0 and attn.attention_weights.bias.abs().sum() == 0
    bias = attn.sampling_offsets.bias.view(8, 3, 4, 2)
    # Head 0 points along +x, head 2 along +y; point p sits at distance p+1 (max-norm), same on every level.
    assert torch.allclose(bias[0, :, :, 0], torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(3, 4))
    assert torch.allclose(bias[2, 1, :, 1], torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert torch.allclose(bias.abs().amax(-1), torch.tensor([1.0, 2.0, 3.0, 4.0]).expand(8, 3, 4))


@pytest.mark.parametrize("size", [(64, 96), (96, 64)])
def test_output_shapes_non_square(size):
    torch.manual_seed(0)
    H, W = size
    cfg = PixelDecoderConfig(in_channels=(8, 16, 32, 64), conv_dim=32, mask_dim=16, num_encoder_layers=1,
                             num_heads=4, num_points=2, ffn_dim=64, num_groups=8)
    feats = {f"res{i}": torch.randn(1, c, H // 2 ** i, W // 2 ** i) for i, c in zip(range(2, 6), cfg.in_channels)}
    with torch.no_grad():
        out = MSDeformAttnPixelDecoder(cfg).eval()(feats)
    assert out.mask_features.shape == (1, 16, H // 4, W // 4)
    assert [tuple(f.shape) for f in out.multi_scale_features] == [(1, 32, H // s, W // s) for s in (32, 16, 8)]
    hw = sum((H // s) * (W // s) for s in (32, 16, 8))
    assert out.encoder_tokens.shape == (1, hw, 32)
    # The first level of the encoder tokens is the res5 map, row-major.
    first = out.multi_scale_features[0].flatten(2).transpose(1, 2)
    assert torch.equal(out.encoder_tokens[:, : first.shape[1]], first)

"""Open-vocabulary masked-attention decoder: official-fixture parity, layout, mask rewrite, export."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from conftest import REL_TOL, rel_diff
from torch import nn

from scan_model.mask_decoder import MaskDecoderConfig, OpenVocabMaskDecoder, unblock_full_rows
from scan_model.pixel_decoder import MSDeformAttnPixelDecoder, PixelDecoderConfig

PREFIX = "sem_seg_head.predictor."
# Tiny fixture config (fixtures/README.md): HIDDEN_DIM 64, NHEADS 8, DIM_FEEDFORWARD 128, DEC_LAYERS 4 (= 4 layers),
# 100 queries, MASK_DIM 64, EMBEDDING_DIM 64, EMBED_HIDDEN_DIM 128, EMBED_LAYERS 2.
FIXTURE_CFG = MaskDecoderConfig(in_channels=64, hidden_dim=64, num_queries=100, num_heads=8, ffn_dim=128,
                                num_layers=4, mask_dim=64, embed_dim=64, embed_hidden_dim=128, embed_layers=2)


def test_fixture_parity(official_dev):
    torch.manual_seed(0)
    model = OpenVocabMaskDecoder(FIXTURE_CFG).eval()
    model.load_state_dict(official_dev.sub_state_dict(PREFIX), strict=True)
    ex = official_dev.expected
    with torch.no_grad():
        multi_scale = [ex[f"pixel_decoder.multi_scale_features.{i}"] for i in range(3)]
        out = model(multi_scale, ex["pixel_decoder.mask_features"])

    assert len(out.aux) == FIXTURE_CFG.num_layers  # 1 + num_layers predictions in all
    diffs = {"pred_logits_raw": rel_diff(out.query_embeddings, ex["decoder.pred_logits_raw"]),
             "pred_masks": rel_diff(out.mask_logits, ex["decoder.pred_masks"]),
             "aux.0.pred_masks": rel_diff(out.aux[0].mask_logits, ex["decoder.aux.0.pred_masks"])}
    for j, pred in enumerate(out.aux):
        diffs[f"aux.{j}.pred_logits_raw"] = rel_diff(pred.query_embeddings, ex[f"decoder.aux.{j}.pred_logits_raw"])
    print("\nmask decoder rel_diff:", {k: f"{v:.2e}" for k, v in diffs.items()})
    assert all(v <= REL_TOL for v in diffs.values()), diffs


def test_state_dict_layout_matches_official_vitB(fixtures_root):
    """Default config = scan_vitB.yaml predictor (10 layers, embed 512): same key names and shapes."""
    keys = json.loads((fixtures_root / "keys_vitB.json").read_text())["keys"]
    official = {k[len(PREFIX):]: tuple(v["shape"]) for k, v in keys.items() if k.startswith(PREFIX)}
    ours = {k: tuple(v.shape) for k, v in OpenVocabMaskDecoder(MaskDecoderConfig()).state_dict().items()}
    assert ours == official


def _official_unblock(mask: torch.Tensor) -> torch.Tensor:
    mask = mask.clone()
    mask[torch.where(mask.sum(-1) == mask.shape[-1])] = False
    return mask


@pytest.mark.parametrize("full_rows", [0, 5, 24])
def test_unblock_rewrite_equals_official_index_put(full_rows):
    g = torch.Generator().manual_seed(full_rows)
    mask = torch.rand(8, 3, 17, generator=g) < 0.7  # 24 rows
    mask.view(-1, 17)[:, 0] = False  # no full row unless forced below
    if full_rows:
        rows = torch.randperm(24, generator=g)[:full_rows]
        mask.view(-1, 17)[rows] = True
    assert int(mask.all(-1).sum()) == full_rows
    ours = unblock_full_rows(mask)
    assert torch.equal(ours, _official_unblock(mask))
    assert not ours.all(-1).any()
    if full_rows < 24:
        assert torch.equal(ours, mask & ~mask.all(-1, keepdim=True)) and ours.any()


class _TinyHead(nn.Module):
    """Pixel decoder + mask decoder returning plain tensors (what an export wrapper does)."""

    def __init__(self):
        super().__init__()
        self.pixel_decoder = MSDeformAttnPixelDecoder(PixelDecoderConfig(
            in_channels=(8, 16, 24, 32), conv_dim=32, mask_dim=16, num_encoder_layers=1, num_heads=4,
            num_points=2, ffn_dim=64, num_groups=8))
        self.decoder = OpenVocabMaskDecoder(MaskDecoderConfig(
            in_channels=32, hidden_dim=32, num_queries=10, num_heads=4, ffn_dim=64, num_layers=3, mask_dim=16,
            embed_dim=16, embed_hidden_dim=32, embed_layers=2))

    def forward(self, res2, res3, res4, res5):
        pix = self.pixel_decoder({"res2": res2, "res3": res3, "res4": res4, "res5": res5})
        out = self.decoder(pix.multi_scale_features, pix.mask_features)
        return out.query_embeddings, out.mask_logits, pix.mask_features, out.aux[0].mask_logits


def _features(h5: int, w5: int, seed: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(1, c, h5 * s, w5 * s, generator=g) for c, s in zip((8, 16, 24, 32), (8, 4, 2, 1)))


def test_export_with_dynamic_size_matches_eager():
    """torch.export with H, W from Dims (image multiple of 32): the program at other sizes equals eager."""
    torch.manual_seed(0)
    model = _TinyHead().eval()
    h, w = torch.export.Dim("h", min=2, max=64), torch.export.Dim("w", min=2, max=64)
    dynamic = {f"res{i}": {2: s * h, 3: s * w} for i, s in zip(range(2, 6), (8, 4, 2, 1))}
    with torch.no_grad():
        program = torch.export.export(model, _features(3, 4, seed=0), dynamic_shapes=dynamic, strict=False)
    exported = program.module()
    for h5, w5 in [(2, 5), (5, 3)]:  # image 64x160 and 160x96
        feats = _features(h5, w5, seed=h5)
        with torch.no_grad():
            ref, got = model(*feats), exported(*feats)
        assert got[1].shape == (1, 10, 8 * h5, 8 * w5)
        for a, b in zip(got, ref):
            assert rel_diff(a, b) <= 1e-5
    # Layer 0's mask (aux 0 at the res5 size) blocks part of the map, so the masked path was exercised.
    blocked = F.interpolate(ref[3], size=(h5, w5), mode="bilinear", align_corners=False).sigmoid() < 0.5
    assert blocked.any() and not blocked.all()

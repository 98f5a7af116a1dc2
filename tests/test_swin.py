"""Swin backbone: parity with the official D2SwinTransformer, any-size inputs, shift mask, export."""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx.experimental._config as fx_config
from torch.export import Dim

from conftest import REL_TOL, rel_diff
from scan_model.swin import SwinBackbone, SwinConfig, drop_path, shifted_window_mask

# MODEL.SWIN of official_dev/config.yaml.
FIXTURE_CFG = SwinConfig(embed_dim=32, depths=(2, 2, 2, 2), num_heads=(2, 4, 8, 16), window_size=7, patch_size=4)


def _tiny(window_size: int = 7, seed: int = 0) -> SwinBackbone:
    torch.manual_seed(seed)
    cfg = SwinConfig(embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), window_size=window_size)
    return SwinBackbone(cfg).eval()


def test_fixture_parity(official_dev):
    weights = official_dev.sub_state_dict("backbone.")
    model = SwinBackbone(FIXTURE_CFG).eval()
    # Our own index buffer must equal the official one before loading overwrites it.
    index_keys = [k for k in weights if k.endswith("relative_position_index")]
    assert len(index_keys) == 8
    for key in index_keys:
        assert torch.equal(model.state_dict()[key], weights[key]), key
    model.load_state_dict(weights, strict=True)

    with torch.no_grad():
        out = model(official_dev.expected["backbone.input"])
    assert list(out) == ["res2", "res3", "res4", "res5"]
    for name, feat in out.items():
        ref = official_dev.expected[f"backbone.{name}"]
        d = rel_diff(feat, ref)
        print(f"backbone.{name} {tuple(feat.shape)} rel_diff={d:.2e}")
        assert d <= REL_TOL, (name, d)
        assert feat.shape[1] == model.out_channels[name]


def test_swin_b_state_dict_layout(fixtures_root):
    """The default config (Swin-B) has exactly the official backbone.* names and shapes (keys_vitB.json)."""
    keys = json.loads((fixtures_root / "keys_vitB.json").read_text())["keys"]
    official = {k[len("backbone."):]: v for k, v in keys.items() if k.startswith("backbone.")}
    with torch.device("meta"):
        model = SwinBackbone(SwinConfig())
    ours = model.state_dict()
    assert sorted(ours) == sorted(official)
    for name, tensor in ours.items():
        assert list(tensor.shape) == official[name]["shape"], name
    assert ours["layers.2.blocks.17.attn.relative_position_index"].dtype == torch.int64
    assert sum(p.numel() for p in model.parameters()) == 86_880_376  # SPEC.md §2.1: 86.9 M


@pytest.mark.parametrize(
    "size, expected",
    [
        ((97, 131), [(25, 33), (13, 17), (7, 9), (4, 5)]),  # odd everywhere: every pad path runs
        ((96, 160), [(24, 40), (12, 20), (6, 10), (3, 5)]),  # /32 but no stage is a multiple of 7
    ],
)
def test_any_input_size(size, expected):
    model = _tiny()
    x = torch.randn(2, 3, *size)
    with torch.no_grad():
        out = model(x)
    for (name, feat), hw, stride in zip(out.items(), expected, (4, 8, 16, 32)):
        assert tuple(feat.shape) == (2, model.out_channels[name], *hw), name
        assert model.strides[name] == stride
        assert torch.isfinite(feat).all(), name
    # PatchEmbed's right/bottom zero pad is the same as feeding the image zero-padded to /4.
    padded = torch.nn.functional.pad(x, (0, -size[1] % 4, 0, -size[0] % 4))
    with torch.no_grad():
        out_padded = model(padded)
    for name in out:
        assert torch.equal(out[name], out_padded[name]), name
    # Batch items are independent (windows never mix samples).
    with torch.no_grad():
        single = model(x[1:])
    for name in out:
        torch.testing.assert_close(single[name][0], out[name][1], rtol=1e-5, atol=1e-5)


def _slice_assignment_mask(Hp: int, Wp: int, ws: int, shift: int) -> torch.Tensor:
    """The textbook Swin construction: paint 9 regions, partition into windows, compare ids."""
    img = torch.zeros(Hp, Wp)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
        for wsl in (slice(0, -ws), slice(-ws, -shift), slice(-shift, None)):
            img[hs, wsl] = cnt
            cnt += 1
    windows = img.view(Hp // ws, ws, Wp // ws, ws).permute(0, 2, 1, 3).reshape(-1, ws * ws)
    diff = windows.unsqueeze(1) - windows.unsqueeze(2)
    return diff.masked_fill(diff != 0, -100.0).masked_fill(diff == 0, 0.0)


@pytest.mark.parametrize("n_rows, n_cols, ws", [(1, 1, 7), (2, 3, 7), (4, 2, 12), (3, 3, 5), (1, 4, 4)])
def test_shift_mask_matches_slice_assignment(n_rows, n_cols, ws):
    ours = shifted_window_mask(n_rows, n_cols, ws, ws // 2, torch.device("cpu"))
    assert ours.shape == (n_rows, n_cols, ws * ws, ws * ws)
    ref = _slice_assignment_mask(n_rows * ws, n_cols * ws, ws, ws // 2)
    assert torch.equal(ours.reshape(-1, ws * ws, ws * ws), ref)
    if n_rows > 1 and n_cols > 1:  # the first window is not cut by the shift, the last one is
        assert (ref[0] == 0).all() and (ref[-1] != 0).any()


def test_export_dynamic_hw():
    """Dynamic H, W survive torch.export; the program matches eager at other sizes of the range.

    backed_size_oblivious is what torch.onnx.export (dynamo) sets internally. Without it torch
    adds layout guards (e.g. "res5 has != 1 window row", "pad != 0") and silently narrows the range.
    """
    model = _tiny()
    x = torch.randn(1, 3, 256, 320)  # every stage has >= 2 window rows/cols and nonzero padding
    dims = {"x": {2: 32 * Dim("h32", min=2, max=32), 3: 32 * Dim("w32", min=2, max=32)}}
    with fx_config.patch(backed_size_oblivious=True):
        ep = torch.export.export(model, (x,), dynamic_shapes=dims, strict=False)
    ranges = {str(k): (int(v.lower), int(v.upper)) for k, v in ep.range_constraints.items()}
    assert sorted(ranges.values()) == [(2, 32), (2, 32), (64, 1024), (64, 1024)], ranges  # not narrowed
    exported = ep.module()
    # 64x64: one window at res4/res5; 224: zero window padding at res2 (56) and res5 (7); 448x96 mixed.
    for h, w in [(64, 64), (224, 160), (448, 96)]:
        y = torch.randn(1, 3, h, w)
        with torch.no_grad():
            ref, got = model(y), exported(y)
        for name in ref:
            assert got[name].shape == ref[name].shape
            torch.testing.assert_close(got[name], ref[name], rtol=1e-5, atol=1e-5)


def test_training_init_and_drop_path():
    model = SwinBackbone(SwinConfig(embed_dim=8, depths=(2, 2), num_heads=(1, 2), window_size=4))
    blocks = [b for stage in model.layers for b in stage.blocks]
    assert [b.drop_path_rate for b in blocks] == pytest.approx([0.0, 0.1, 0.2, 0.3])
    attn = blocks[0].attn
    assert attn.qkv.bias.abs().max() == 0 and attn.proj.bias.abs().max() == 0
    assert 0.005 < attn.relative_position_bias_table.std() < 0.05
    assert torch.equal(blocks[0].norm1.weight, torch.ones(8))
    # Stochastic depth: per sample, either dropped (0) or kept and rescaled by 1/keep; identity in eval.
    torch.manual_seed(0)
    x = torch.ones(64, 3, 5)
    y = drop_path(x, 0.25, training=True)
    per_sample = y.flatten(1)
    assert (per_sample == per_sample[:, :1]).all()  # one decision per sample
    assert set(per_sample[:, 0].tolist()) == {0.0, float(torch.tensor(1 / 0.75))}
    assert torch.equal(drop_path(x, 0.25, training=False), x)

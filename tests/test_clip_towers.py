"""The two CLIP towers: official-weight loading, fixture parity, contextual shift, export."""

from __future__ import annotations

import random

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.transformer import QuickGELU
from torch import nn

from conftest import REL_TOL, rel_diff
from scan_model.clip_towers import (
    PRETRAINED_FILES,
    build_clip,
    build_visual,
    clip_config,
    contextual_shift_key,
    deterministic_shift_selection,
    global_clip_forward,
    load_open_clip_weights,
    official_shift_selection,
    patch_foreground,
    region_clip_forward,
)

TINY = "SCAN-tiny-16"
REPLACE_LAYERS = [1, 3, 5]  # fixture config CLIP_ADAPTER.REPLACE_LAYER


@pytest.fixture(scope="module")
def official_towers(official_dev):
    cfg = clip_config(TINY)
    clip = build_clip(cfg)
    clip.load_state_dict(official_dev.sub_state_dict("clip_adapter.clip_model."), strict=True)
    original = build_visual(cfg)
    original.load_state_dict(official_dev.sub_state_dict("clip_adapter.original_clip."), strict=True)
    with torch.no_grad():
        glob = global_clip_forward(original, official_dev.expected["orig_clip.input"], range(7), range(7))
    return cfg, clip, original, glob


@pytest.fixture(scope="module")
def random_clip():
    """Random tiny CLIP (no fixtures needed) and random regions with structured masks."""
    torch.manual_seed(0)
    cfg = clip_config(TINY)
    clip = build_clip(cfg)
    regions = torch.randn(4, 3, 224, 224)
    masks = _random_masks(4, generator=torch.Generator().manual_seed(1))
    shift = torch.randn(len(REPLACE_LAYERS), cfg.width) * 3
    with torch.no_grad():
        plain = clip.visual(regions)  # open_clip's own forward
    return cfg, clip, regions, masks, shift, plain


def _random_masks(n: int, generator: torch.Generator) -> torch.Tensor:
    """Binary (n, 1, 224, 224) masks: an all-foreground, an all-background, single pixels, rectangles."""
    masks = torch.zeros(n, 1, 224, 224)
    masks[0] = 1.0
    # masks[1] stays all background
    if n > 2:
        ys, xs = torch.randint(0, 224, (2, 30), generator=generator)
        masks[2, 0, ys, xs] = 1.0  # isolated pixels: each makes its whole patch foreground
    for i in range(3, n):
        y0, x0 = torch.randint(0, 150, (2,), generator=generator).tolist()
        h, w = torch.randint(5, 74, (2,), generator=generator).tolist()
        masks[i, 0, y0 : y0 + h, x0 : x0 + w] = 1.0
    return masks


# ---------------------------------------------------------------------------------------------
# configs and weights


def test_configs_match_open_clip_and_unknown_name_lists_known():
    for name, grid in (("ViT-B-16", 14), ("ViT-L-14", 16)):
        cfg = clip_config(name)
        ref = open_clip.get_model_config(name)  # read-only lookup, the registry is not mutated
        assert cfg.embed_dim == ref["embed_dim"] and cfg.vision == ref["vision_cfg"] and cfg.text == ref["text_cfg"]
        assert cfg.grid_size == grid
    assert clip_config("ViT-L/14").vision == clip_config("ViT-L-14").vision
    tiny = clip_config(TINY)
    assert (tiny.grid_size, tiny.width, tiny.layers, tiny.heads, tiny.embed_dim) == (14, 64, 6, 2, 64)
    with pytest.raises(ValueError) as err:
        clip_config("ViT-H-99")
    for known in ("ViT-H-99", "ViT-B-16", "ViT-L-14", TINY):
        assert known in str(err.value)


def test_towers_use_exact_gelu_and_have_official_keys(fixtures_root):
    import json

    cfg = clip_config("ViT-B-16")
    with torch.device("meta"):  # layout only, no memory
        clip, visual = build_clip(cfg), build_visual(cfg)
    acts = [m for m in clip.modules() if isinstance(m, (nn.GELU, QuickGELU))]
    assert acts and all(type(m) is nn.GELU and m.approximate == "none" for m in acts)
    assert clip.logit_bias is None
    official = json.loads((fixtures_root / "keys_vitB.json").read_text())["keys"]

    def layout(prefix):
        return {k[len(prefix):]: v["shape"] for k, v in official.items() if k.startswith(prefix)}

    assert {k: list(v.shape) for k, v in clip.state_dict().items()} == layout("clip_adapter.clip_model.")
    assert {k: list(v.shape) for k, v in visual.state_dict().items()} == layout("clip_adapter.original_clip.")


def test_load_open_clip_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    visual = build_visual(clip_config(TINY))
    state = {k: v.clone() for k, v in visual.state_dict().items()}
    torch.save({"state_dict": {"module." + k: v for k, v in state.items()}, "epoch": 3}, tmp_path / "ckpt.pt")
    save_file(state, str(tmp_path / "w.safetensors"))
    for name in ("ckpt.pt", "w.safetensors"):
        loaded = load_open_clip_weights(tmp_path / name)
        assert loaded.keys() == state.keys()
        assert all(torch.equal(loaded[k], state[k]) for k in state)
        build_visual(clip_config(TINY)).load_state_dict(loaded, strict=True)
    with pytest.raises(FileNotFoundError, match="DataComp.XL-s13B-b90K"):
        load_open_clip_weights(tmp_path / "absent.bin")
    assert set(PRETRAINED_FILES) == {"ViT-B-16", "ViT-L-14"}


# ---------------------------------------------------------------------------------------------
# fixture parity


def test_original_clip_matches_fixture(official_dev, official_towers):
    _, _, _, glob = official_towers
    exp = official_dev.expected
    for k in range(7):
        d_tok = rel_diff(glob.layer_tokens[k].transpose(0, 1), exp[f"orig_clip.tokens.{k}"])  # fixture is LND
        d_cls = rel_diff(glob.layer_cls[:, k : k + 1], exp[f"orig_clip.cls.{k}"])
        print(f"orig_clip layer {k}: tokens rel_diff {d_tok:.2e}, cls rel_diff {d_cls:.2e}")
        assert d_tok <= REL_TOL and d_cls <= REL_TOL
    d_final = rel_diff(glob.final_cls, exp["orig_clip.final_cls_token"])
    print(f"orig_clip final_cls_token rel_diff {d_final:.2e}")
    assert d_final <= REL_TOL


@pytest.mark.parametrize("rule", ["deterministic", "official"])
def test_region_clip_matches_fixture(official_dev, official_towers, rule):
    cfg, clip, _, glob = official_towers
    exp = official_dev.expected
    foreground = patch_foreground(exp["clip_adapter.region_masks.firstN"], cfg.patch_size)
    shift = glob.layer_cls[0, REPLACE_LAYERS]  # CLS after blocks 1, 3, 5 (index = layer)
    with torch.no_grad():
        feats = region_clip_forward(
            clip.visual, exp["clip_adapter.regions.firstN"], foreground, shift, REPLACE_LAYERS, 0.0, rule=rule
        )
    d = rel_diff(feats, exp["region_clip.image_features_unnorm"][:4])
    print(f"region_clip image_features_unnorm[:4] ({rule}) rel_diff {d:.2e}")
    assert d <= REL_TOL


# ---------------------------------------------------------------------------------------------
# contextual shift


def test_patch_foreground_equals_official_fp16_pooling():
    masks = _random_masks(8, generator=torch.Generator().manual_seed(5))
    ours = patch_foreground(masks, 16)
    official = torch.ceil(F.avg_pool2d(masks.half(), 16)).reshape(8, -1) == 1
    assert ours.shape == (8, 196) and ours.dtype == torch.bool
    assert torch.equal(ours, official)
    assert ours[0].all() and not ours[1].any() and 0 < ours[2].sum() <= 30


@pytest.mark.parametrize("num_patches", [196, 256])
def test_deterministic_selection_counts_and_order(num_patches):
    ratios = [0.0, 0.05, 0.07, 0.15, 0.29, 0.5, 0.57, 1.0]
    gen = torch.Generator().manual_seed(num_patches)
    # every background count 0..P once, in random positions
    counts = torch.arange(num_patches + 1)
    order = torch.stack([torch.randperm(num_patches, generator=gen) for _ in counts])
    background = torch.zeros(num_patches + 1, num_patches, dtype=torch.bool)
    background.scatter_(1, order, torch.arange(num_patches)[None, :] < counts[:, None])
    key = contextual_shift_key(num_patches, seed=0)
    assert torch.equal(key, contextual_shift_key(num_patches, seed=0))
    assert not torch.equal(key, contextual_shift_key(num_patches, seed=1))
    assert torch.equal(key.sort().values, torch.arange(num_patches))
    for ratio in ratios:
        sel = deterministic_shift_selection(background, ratio, key)
        expected_counts = torch.tensor([int(ratio * c) for c in counts.tolist()])
        assert torch.equal(sel.sum(1), expected_counts), ratio
        assert not (sel & ~background).any(), "a foreground patch was selected"
        # the selected patches are the background patches with the smallest keys
        for row in (7, num_patches // 2, num_patches):
            bg_idx = background[row].nonzero().flatten()
            first = bg_idx[key[bg_idx].argsort()][: int(ratio * len(bg_idx))]
            assert set(sel[row].nonzero().flatten().tolist()) == set(first.tolist())


def test_official_selection_counts_and_reproducible():
    background = ~patch_foreground(_random_masks(6, generator=torch.Generator().manual_seed(2)), 16)
    for ratio in (0.05, 0.15, 0.5):
        a = official_shift_selection(background, ratio, random.Random(7))
        b = official_shift_selection(background, ratio, random.Random(7))
        assert torch.equal(a, b)
        assert torch.equal(a.sum(1), torch.tensor([int(ratio * int(c)) for c in background.sum(1)]))
        assert not (a & ~background).any()
    c = official_shift_selection(background, 0.5, random.Random(8))
    assert not torch.equal(a, c)


def _reference_shifted_forward(visual, regions, masks, shift, layers, choose):
    """SPEC.md §1.12 written out literally: fp16 ceil-avgpool mask, x_fg * m + x_bg with the chosen
    background entries of x_bg overwritten, open_clip's own embedding and pooling."""
    n = regions.shape[0]
    m = torch.ceil(F.avg_pool2d(masks.half(), 16)).float().reshape(n, -1, 1)
    x = visual._embeds(regions)
    for d, block in enumerate(visual.transformer.resblocks, start=1):
        x = block(x)
        if d in layers:
            x_fg = x[:, 1:] * m
            x_bg = x[:, 1:] * (1 - m)
            for j in range(n):
                candidates = torch.nonzero(m[j, :, 0] == 0).flatten().tolist()
                x_bg[j, choose(candidates, j)] = shift[layers.index(d)]
            x = torch.cat([x[:, :1], x_fg + x_bg], dim=1)
    pooled, _ = visual._pool(x)
    return pooled @ visual.proj


def test_region_forward_matches_literal_reference(random_clip):
    cfg, clip, regions, masks, shift, plain = random_clip
    visual = clip.visual
    foreground = patch_foreground(masks, cfg.patch_size)
    ratio = 0.15
    key = contextual_shift_key(cfg.num_patches, seed=3)
    with torch.no_grad():
        # official rule: same Python RNG stream as the reference's random.sample calls
        ref_rng = random.Random(11)
        ref = _reference_shifted_forward(
            visual, regions, masks, shift, REPLACE_LAYERS, lambda c, j: ref_rng.sample(c, int(ratio * len(c)))
        )
        ours = region_clip_forward(
            visual, regions, foreground, shift, REPLACE_LAYERS, ratio, rule="official", rng=random.Random(11)
        )
        d_off = rel_diff(ours, ref)
        again = region_clip_forward(
            visual, regions, foreground, shift, REPLACE_LAYERS, ratio, rule="official", rng=random.Random(11)
        )
        # deterministic rule: the smallest-key background patches, the same set at every layer
        ref_det = _reference_shifted_forward(
            visual, regions, masks, shift, REPLACE_LAYERS,
            lambda c, j: torch.tensor(c, dtype=torch.long)[key[c].argsort()][: int(ratio * len(c))].tolist(),
        )
        det = region_clip_forward(visual, regions, foreground, shift, REPLACE_LAYERS, ratio, shift_key=key)
        d_det = rel_diff(det, ref_det)
    print(f"shifted forward vs literal reference: official {d_off:.2e}, deterministic {d_det:.2e}")
    assert d_off <= 1e-6 and d_det <= 1e-6
    assert torch.equal(ours, again)
    # the shift has an effect on regions with background, none on the all-foreground region 0
    assert rel_diff(ours[1:], plain[1:]) > 1e-3 and rel_diff(det[1:], plain[1:]) > 1e-3
    assert rel_diff(ours[:1], plain[:1]) <= 1e-6 and rel_diff(det[:1], plain[:1]) <= 1e-6


@pytest.mark.parametrize("rule", ["deterministic", "official"])
def test_ratio_zero_equals_open_clip_forward(random_clip, rule):
    cfg, clip, regions, masks, shift, plain = random_clip
    foreground = patch_foreground(masks, cfg.patch_size)
    with torch.no_grad():
        ours = region_clip_forward(clip.visual, regions, foreground, shift, REPLACE_LAYERS, 0.0, rule=rule)
    d = rel_diff(ours, plain)
    print(f"ratio 0 ({rule}) vs open_clip visual(): rel_diff {d:.2e}")
    assert d <= 1e-6


class _RegionClip(nn.Module):
    """An export wrapper: the region tower with the deterministic shift, key as a buffer."""

    def __init__(self, visual: nn.Module, grid_cells: int, ratio: float):
        super().__init__()
        self.visual = visual
        self.ratio = ratio
        self.register_buffer("shift_key", contextual_shift_key(grid_cells, seed=0), persistent=False)

    def forward(self, regions, foreground, shift_tokens):
        return region_clip_forward(
            self.visual, regions, foreground, shift_tokens, REPLACE_LAYERS, self.ratio, shift_key=self.shift_key
        )


def test_export_region_clip_dynamic_n(random_clip):
    cfg, clip, regions, masks, shift, _ = random_clip
    foreground = patch_foreground(masks, cfg.patch_size)
    model = _RegionClip(clip.visual, cfg.num_patches, 0.15).eval()
    n = torch.export.Dim("n", min=1, max=128)
    with torch.no_grad():
        ep = torch.export.export(
            model,
            (regions[:3], foreground[:3], shift),
            dynamic_shapes=({0: n}, {0: n}, None),
            strict=False,
        )
        ops = {str(node.target) for node in ep.graph.nodes if node.op == "call_function"}
        assert not any(bad in op for op in ops for bad in ("randperm", "nonzero", "topk", "index_put")), ops
        exported = ep.module()
        for k in (4, 2):
            d = rel_diff(exported(regions[:k], foreground[:k], shift), model(regions[:k], foreground[:k], shift))
            print(f"exported vs eager at N={k}: rel_diff {d:.2e}")
            assert d <= 1e-5


def test_per_layer_keys_select_official_counts_at_every_layer():
    """The exported graph's selection: counts table + a permutation per layer and region."""
    import numpy as np

    from runtime.settings import random_shift_keys, shift_counts, shift_key
    from scan_model.clip_towers import ranked_shift_selection

    num_patches = 196
    background = ~patch_foreground(_random_masks(6, generator=torch.Generator().manual_seed(4)), 16)
    assert torch.equal(contextual_shift_key(num_patches, 5), torch.from_numpy(shift_key(num_patches, 5)))
    for ratio in (0.0, 0.05, 0.29, 0.5):
        counts = torch.tensor(shift_counts(num_patches, ratio))
        keys = torch.from_numpy(random_shift_keys(3, 6, num_patches, np.random.default_rng(1)))
        sel = ranked_shift_selection(background, counts, keys)
        assert sel.shape == (3, 6, num_patches)
        expected = torch.tensor([int(ratio * int(c)) for c in background.sum(1)])
        assert all(torch.equal(layer.sum(1), expected) for layer in sel), ratio
        assert not (sel & ~background).any(), "a foreground patch was selected"
        if ratio >= 0.29:
            assert not torch.equal(sel[0], sel[1])  # fresh draws per layer, as random.sample per layer
        # one key repeated for every layer and region is the deterministic rule
        key = contextual_shift_key(num_patches, 2)
        repeated = ranked_shift_selection(background, counts, key.expand(3, 6, num_patches))
        single = deterministic_shift_selection(background, ratio, key)
        assert all(torch.equal(layer, single) for layer in repeated)


def test_selection_input_equals_the_deterministic_rule(random_clip):
    """region_clip_forward(selection=...) (the export path) equals the rule computed inside."""
    from runtime.settings import shift_counts
    from scan_model.clip_towers import ranked_shift_selection

    cfg, clip, regions, masks, shift, plain = random_clip
    foreground = patch_foreground(masks, cfg.patch_size)
    key = contextual_shift_key(cfg.num_patches, seed=3)
    counts = torch.tensor(shift_counts(cfg.num_patches, 0.15))
    selection = ranked_shift_selection(~foreground, counts, key.expand(len(REPLACE_LAYERS), regions.shape[0], -1))
    with torch.no_grad():
        inside = region_clip_forward(clip.visual, regions, foreground, shift, REPLACE_LAYERS, 0.15, shift_key=key)
        given = region_clip_forward(clip.visual, regions, foreground, shift, REPLACE_LAYERS, 0.0, selection=selection)
    assert torch.equal(inside, given)


@pytest.mark.parametrize("replace_layers", [REPLACE_LAYERS, [1, 6]])
def test_last_block_runs_for_the_cls_token_only(random_clip, replace_layers):
    """The region tower's last block computes the CLS token alone (a FLOP cut): the features equal
    a forward that runs every token through every block, for both shift rules, including a shift
    after the last block (a no-op that the official rule must still draw from its RNG)."""
    from scan_model.clip_towers import _block, _cls_block, _embed, _head

    cfg, clip, regions, masks, shift, plain = random_clip
    visual = clip.visual
    foreground = patch_foreground(masks, cfg.patch_size)
    tokens = torch.randn(len(replace_layers), cfg.width) * 3
    with torch.no_grad():
        x = _embed(visual, regions)
        for i in range(cfg.layers - 1):
            x = _block(visual, i, x)
        full = _block(visual, cfg.layers - 1, x)
        assert rel_diff(_cls_block(visual, cfg.layers - 1, x), full[:, :1]) < REL_TOL
        assert rel_diff(region_clip_forward(visual, regions, foreground, tokens, replace_layers, 0.0), _head(visual, full)) < REL_TOL
        assert rel_diff(region_clip_forward(visual, regions, foreground, tokens, replace_layers, 0.0), plain) < REL_TOL
        rng_a, rng_b = random.Random(5), random.Random(5)
        region_clip_forward(visual, regions, foreground, tokens, replace_layers, 0.3, rule="official", rng=rng_a)
        for _ in replace_layers:  # the official rule draws at every listed layer, the last one included
            official_shift_selection(~foreground, 0.3, rng_b)
        assert rng_a.random() == rng_b.random()

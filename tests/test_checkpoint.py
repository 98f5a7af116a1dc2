"""Official checkpoints map onto our modules; our own checkpoints round-trip."""

from __future__ import annotations

import json

import pytest
import torch

from scan_model.checkpoint import (
    CheckpointError,
    IGNORED_OFFICIAL_KEYS,
    convert_official_state_dict,
    load_official_into,
    official_to_ours,
    read_checkpoint_config,
    save_checkpoint,
)
from scan_model.loading import load_model
from scan_model.model import ScanModel
from scan_model.presets import preset


def _meta_state(name: str) -> dict[str, tuple[int, ...]]:
    """Our state dict shapes for a preset, built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        model = ScanModel(preset(name))
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name, keys_file", [("vitl", "keys_vitL.json"), ("vitb", "keys_vitB.json")])
def test_official_key_coverage(fixtures_root, name, keys_file):
    official = json.loads((fixtures_root / keys_file).read_text())["keys"]
    ours = _meta_state(name)
    unmapped, wrong_shape, targets = [], [], set()
    for key, info in official.items():
        if key in IGNORED_OFFICIAL_KEYS:
            continue
        target = official_to_ours(key)
        if target is None or target not in ours:
            unmapped.append(f"{key} -> {target}")
        elif ours[target] != tuple(info["shape"]):
            wrong_shape.append(f"{key}: {info['shape']} vs {ours[target]}")
        targets.add(target)
    assert not unmapped, f"{len(unmapped)} official keys without a place: {unmapped[:10]}"
    assert not wrong_shape, f"{len(wrong_shape)} shape mismatches: {wrong_shape[:10]}"
    left_over = sorted(set(ours) - targets)
    assert not left_over, f"{len(left_over)} of our parameters/buffers are not in the official checkpoint: {left_over[:10]}"


def test_official_fixture_loads_without_missing_keys(official_dev):
    cfg_path = official_dev.root / "config.yaml"
    loaded = load_model(official_dev.root / "model.pth", cfg_path)
    assert loaded.report.ok
    assert sorted(loaded.report.ignored) == sorted(IGNORED_OFFICIAL_KEYS)
    ours = loaded.model.state_dict()
    converted, _ = convert_official_state_dict(official_dev.state_dict)
    for key, value in converted.items():
        assert torch.equal(ours[key], value), key


def test_checkpoint_of_wrong_architecture_names_keys(official_dev, tmp_path):
    model = ScanModel(preset("tiny"))
    state = dict(official_dev.state_dict)
    state["sem_seg_head.predictor.query_feat.weight"] = torch.zeros(50, 64)
    del state["LFM.conv1.bias"]
    state["some.extra.key"] = torch.zeros(1)
    bad = tmp_path / "bad.pth"
    torch.save({"model": state}, bad)
    with pytest.raises(CheckpointError) as info:
        load_official_into(model, bad)
    message = str(info.value)
    assert "mask_decoder.query_feat.weight" in message and "(50, 64)" in message
    assert "calibration.lfm.conv1.bias" in message
    assert "some.extra.key" in message


def test_vitb_checkpoint_into_tiny_config_is_refused(tmp_path):
    with torch.device("meta"):
        vitb = ScanModel(preset("vitb"))
    # A small slice of a ViT-B state dict is enough to show the shape report.
    state = {"backbone.patch_embed.proj.weight": torch.zeros(tuple(vitb.backbone.patch_embed.proj.weight.shape))}
    path = tmp_path / "vitb_part.pth"
    torch.save({"model": state}, path)
    with pytest.raises(CheckpointError, match="mis-shaped"):
        load_official_into(ScanModel(preset("tiny")), path)


def test_missing_and_corrupt_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope.pth", "tiny")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_model(junk, "tiny")
    with pytest.raises(CheckpointError, match="--config"):
        load_model(junk, None)


def test_safetensors_roundtrip(tmp_path):
    loaded = load_model(None, "tiny", seed=3)
    path = save_checkpoint(loaded.model, loaded.cfg, tmp_path / "tiny")
    assert path.suffix == ".safetensors" and path.with_suffix(".json").is_file()
    assert read_checkpoint_config(path) == loaded.cfg
    again = load_model(path)
    for key, value in loaded.model.state_dict().items():
        assert torch.equal(again.model.state_dict()[key], value), key
    # The embedded copy of the config is enough when the JSON is gone.
    path.with_suffix(".json").unlink()
    assert read_checkpoint_config(path) == loaded.cfg
    assert not list(tmp_path.glob(".*tmp")), "temporary files left behind"


def test_random_weights_are_seeded():
    a = load_model(None, "tiny", seed=1).model.state_dict()
    b = load_model(None, "tiny", seed=1).model.state_dict()
    c = load_model(None, "tiny", seed=2).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_clip_towers_from_a_local_open_clip_file(tmp_path):
    from safetensors.torch import save_file

    from scan_model.clip_towers import build_clip

    torch.manual_seed(7)
    reference = build_clip(preset("tiny").clip)
    weights = tmp_path / "open_clip_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(weights))
    loaded = load_model(None, "tiny", clip_weights=weights).model
    for key, value in reference.state_dict().items():
        assert torch.equal(loaded.clip.state_dict()[key], value), key
    for key, value in loaded.original_clip.state_dict().items():
        assert torch.equal(value, reference.visual.state_dict()[key]), key


def test_pretrained_tag_without_a_file_names_the_file_to_pass():
    with pytest.raises(CheckpointError) as info:
        load_model(None, "vitb", clip_weights="datacomp_xl_s13b_b90k")
    message = str(info.value)
    assert "nothing is downloaded" in message and "CLIP-ViT-B-16-DataComp.XL-s13B-b90K" in message

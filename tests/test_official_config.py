"""Official YAML configs are read as data and translated into our configs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from scan_model.official_config import ConfigError, load_config, read_yaml
from scan_model.presets import PRESETS, apply_benchmark_settings, preset

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "official_configs"


def _official(name: str) -> Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"official configs not found at {SHARED_DATA}")
    return path


@pytest.mark.parametrize("yaml_name, preset_name", [("scan_vitB.yaml", "vitb"), ("scan_vitL.yaml", "vitl")])
def test_official_yaml_equals_preset(yaml_name, preset_name):
    cfg = load_config(_official(yaml_name))
    assert cfg.to_dict() == preset(preset_name).to_dict()


def test_eval_tag_is_mapped_not_executed():
    data = read_yaml(_official("scan_vitL.yaml"))
    assert data["INPUT"]["MIN_SIZE_TRAIN"] == list(range(320, 1281, 64))


def test_unknown_eval_expression_is_refused(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text('MODEL:\n  X: !!python/object/apply:eval ["__import__(\'os\').system(\'true\')"]\n')
    with pytest.raises(ConfigError, match="refusing to evaluate"):
        read_yaml(path)


def test_demo_yaml_with_slash_clip_name_loads():
    cfg = load_config(_official("scan_vitL_demo.yaml"))
    assert cfg.clip.model_name == "ViT-L-14"
    assert cfg.calibration.embed_dim == 768 and cfg.calibration.grid_size == 16


def test_unknown_clip_model_lists_known_ones(tmp_path):
    text = _official("scan_vitB.yaml").read_text().replace('CLIP_MODEL_NAME: "ViT-B-16"', 'CLIP_MODEL_NAME: "ViT-H-99"')
    path = tmp_path / "unknown.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "ViT-H-99" in message and "ViT-B-16" in message and "ViT-L-14" in message and "SCAN-tiny-16" in message


def test_not_a_scan_config(tmp_path):
    path = tmp_path / "other.yaml"
    path.write_text("MODEL:\n  META_ARCHITECTURE: GeneralizedRCNN\n")
    with pytest.raises(ConfigError, match="META_ARCHITECTURE"):
        load_config(path)


def test_unsupported_setting_is_named(tmp_path):
    text = _official("scan_vitB.yaml").read_text().replace("MASK_MATTING: False", "MASK_MATTING: True")
    path = tmp_path / "matting.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="MASK_MATTING"):
        load_config(path)


def test_unknown_preset_and_missing_file():
    with pytest.raises(ConfigError, match="preset"):
        load_config("vitz")
    with pytest.raises(ConfigError, match="not found"):
        load_config("no/such/file.yaml")


def test_fixture_config_matches_tiny(official_dev):
    cfg = load_config(official_dev.root / "config.yaml")
    tiny = preset("tiny")
    for part in ("swin", "pixel_decoder", "mask_decoder", "calibration", "clip"):
        assert getattr(cfg, part) == getattr(tiny, part), part
    assert cfg.clip_tap_layers == (2, 4, 6)
    assert cfg.inference.replace_ratio == 0.0 and cfg.inference.mask_threshold == 0.4


def test_json_roundtrip(tmp_path):
    for name in PRESETS:
        cfg = preset(name)
        path = tmp_path / f"{name}.json"
        import json

        path.write_text(json.dumps(cfg.to_dict()))
        assert load_config(path) == cfg


def test_inconsistent_config_is_refused():
    cfg = preset("tiny")
    cfg = dataclasses.replace(cfg, clip_tap_layers=(2, 4))
    with pytest.raises(ValueError, match="sigmas"):
        cfg.validate()


def test_benchmark_settings():
    cfg = preset("vitl")
    assert apply_benchmark_settings(cfg, "ade847")
    assert (cfg.inference.mask_threshold, cfg.inference.ensemble_weight, cfg.inference.replace_ratio) == (0.30, 0.75, 0.15)
    assert cfg.inference.log_ensemble
    assert not apply_benchmark_settings(preset("tiny"), "ade150")

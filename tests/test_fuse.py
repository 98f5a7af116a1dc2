"""`scan fuse` (SPEC §3.5): a finetuned CLIP replaces `model.clip` and nothing else, or nothing is written."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from cli import app
from official_format import write_official_checkpoint
from scan_model.checkpoint import save_checkpoint
from scan_model.clip_towers import ClipConfig, build_clip
from scan_model.finetune.fuse import FuseError, fuse_checkpoint, fuse_clip, read_finetuned_clip
from scan_model.loading import load_model

runner = CliRunner()


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}


@pytest.fixture(scope="module")
def seeds():
    """The seg model (seed 0) and the model whose CLIP plays the finetuned one (seed 1)."""
    return load_model(None, "tiny", seed=0).model, load_model(None, "tiny", seed=1).model


@pytest.fixture(scope="module")
def seg_checkpoint(seeds, tmp_path_factory):
    model = seeds[0]
    return save_checkpoint(model, model.cfg, tmp_path_factory.mktemp("seg") / "seg.safetensors")


@pytest.fixture(scope="module")
def finetuned_file(seeds, tmp_path_factory):
    """Our finetuning output: `clip_model.*` and `original_clip_visual.*` in one safetensors file."""
    finetuned = seeds[1]
    tensors = {f"clip_model.{k}": v for k, v in _state(finetuned.clip).items()}
    tensors |= {f"original_clip_visual.{k}": v for k, v in _state(finetuned.original_clip).items()}
    path = tmp_path_factory.mktemp("clip") / "cs_clip.safetensors"
    save_file(tensors, str(path))
    return path


@pytest.fixture(scope="module")
def official_seg(tmp_path_factory):
    """The seed-0 tiny model in the official detectron2 format (`{"model": ...}`, official key names)."""
    return write_official_checkpoint(tmp_path_factory.mktemp("official") / "seg.pth", seed=0, config="tiny")


def _assert_fused(out, seeds):
    """`out` holds seed 1's CLIP and every other weight of seed 0 (original_clip included)."""
    seg, finetuned = seeds
    loaded = load_model(out)
    expected = {f"clip.{k}": v for k, v in _state(finetuned.clip).items()}
    expected |= {k: v for k, v in _state(seg).items() if not k.startswith("clip.")}
    got = _state(loaded.model)
    assert got.keys() == expected.keys()
    different = [k for k in got if not torch.equal(got[k], expected[k])]
    assert not different, different[:5]
    return loaded


def _changed_keys(seeds) -> list[str]:
    a, b = (_state(m.clip) for m in seeds)
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_fuse_our_finetuning_output(seeds, seg_checkpoint, finetuned_file, tmp_path):
    out = tmp_path / "fused.safetensors"
    report = fuse_checkpoint(seg_checkpoint, finetuned_file, out, ensemble_weight=0.5)
    loaded = _assert_fused(out, seeds)
    clip_keys = list(seeds[0].clip.state_dict())
    assert sorted(report.replaced) == sorted(clip_keys) and not report.ignored and not report.kept
    assert sorted(report.changed) == sorted(_changed_keys(seeds)) and 0 < len(report.changed) < len(clip_keys)
    assert loaded.cfg.inference.ensemble_weight == 0.5 == report.ensemble_weight and report.ensemble_weight_given
    visual = sum(k.startswith("visual.") for k in clip_keys)
    summary = report.lines()[0]
    assert summary.startswith(f"replaced {len(clip_keys)} CLIP keys (visual {visual}, text ")
    assert f"logit_scale), {len(report.changed)} changed" in summary


def test_fuse_official_cs_clip_into_official_checkpoint(seeds, official_seg, tmp_path):
    """CS_CLIP.pt in OpenCLIP's training format and a detectron2-format SCAN .pth give the same result."""
    state = {f"module.clip_model.{k}": v for k, v in _state(seeds[1].clip).items()}
    state |= {f"module.original_clip_visual.{k}": torch.zeros_like(v) for k, v in _state(seeds[1].original_clip).items()}
    cs_clip = tmp_path / "CS_CLIP.pt"
    torch.save({"state_dict": state, "epoch": 3, "name": "run"}, cs_clip)
    out = tmp_path / "fused.safetensors"
    report = fuse_checkpoint(official_seg, cs_clip, out, config="tiny")
    loaded = _assert_fused(out, seeds)
    assert sorted(report.changed) == sorted(_changed_keys(seeds))
    assert loaded.cfg.inference.ensemble_weight == 0.7 == report.ensemble_weight and not report.ensemble_weight_given


def test_ignored_and_kept_keys_are_reported(seeds):
    seg = load_model(None, "tiny", seed=0).model
    state = _state(seeds[1].clip)
    del state["logit_scale"]
    state["visual.mask_embedding"] = torch.zeros(3, 64)  # an ov-seg leftover the model has no place for
    with torch.no_grad():
        seg.clip.logit_scale.fill_(1.25)  # a value no random init gives, to see it kept
    report = fuse_clip(seg, state)
    assert report.ignored == ["visual.mask_embedding"] and report.kept == ["logit_scale"]
    assert seg.clip.logit_scale.item() == 1.25
    assert torch.equal(seg.clip.visual.conv1.weight, seeds[1].clip.visual.conv1.weight)
    assert any("kept" in line and "logit_scale" in line for line in report.lines())


def _cli(*args):
    return runner.invoke(app, ["fuse", *map(str, args)])


def _one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_cli_writes_and_reminds_about_zero_ensemble_weight(seg_checkpoint, finetuned_file, tmp_path):
    out = tmp_path / "fused.safetensors"
    result = _cli("--checkpoint", seg_checkpoint, "--clip", finetuned_file, "--out", out, "--ensemble-weight", "0")
    assert result.exit_code == 0, result.output
    assert out.is_file() and out.with_suffix(".json").is_file()
    assert "original_clip untouched" in result.stderr and f"fuse: wrote {out}" in result.stderr
    assert "not used at inference until --ensemble-weight" in result.stderr
    assert load_model(out).cfg.inference.ensemble_weight == 0.0


def test_cli_refuses_a_clip_of_another_architecture(seg_checkpoint, tmp_path):
    vision = {"image_size": 224, "layers": 6, "width": 32, "head_width": 32, "patch_size": 16}
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1, "layers": 2}
    other = build_clip(ClipConfig(model_name="other", embed_dim=32, vision=vision, text=text))
    clip_file = tmp_path / "open_clip_model.safetensors"
    save_file(_state(other), str(clip_file))
    out = tmp_path / "out" / "fused.safetensors"
    line = _one_error_line(_cli("--checkpoint", seg_checkpoint, "--clip", clip_file, "--out", out))
    assert "visual.class_embedding (32,) vs (64,)" in line
    assert "visual width 32, 6 layers" in line and "SCAN-tiny-16 with width 64, 6 layers" in line
    assert not out.parent.exists()


def _bad_files(tmp_path, seg_checkpoint, official_seg):
    no_visual = tmp_path / "text_only.safetensors"
    save_file({"token_embedding.weight": torch.zeros(4, 2)}, str(no_visual))
    unknown_visual = tmp_path / "unknown.safetensors"
    save_file({"visual.trunk.weight": torch.zeros(2)}, str(unknown_visual))
    pickled = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), pickled)  # a pickled module, refused by weights_only
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 1}, empty)
    return {"missing": (tmp_path / "nope.pt", "finetuned CLIP file not found"),
            "no_visual": (no_visual, "is not a CLIP checkpoint"),
            "ours_as_clip": (seg_checkpoint, "looks like a segmentation checkpoint: pass that as --checkpoint"),
            "official_as_clip": (official_seg, "looks like a segmentation checkpoint: pass that as --checkpoint"),
            "unknown_visual": (unknown_visual, "visual keys exist in the model's CLIP"),
            "pickled": (pickled, "weights_only=True"),
            "empty": (empty, "holds no tensors")}


CLIP_CASES = ["missing", "no_visual", "ours_as_clip", "official_as_clip", "unknown_visual", "pickled", "empty"]


@pytest.mark.parametrize("case", CLIP_CASES)
def test_cli_bad_clip_files(case, seg_checkpoint, official_seg, tmp_path):
    clip_file, message = _bad_files(tmp_path, seg_checkpoint, official_seg)[case]
    out = tmp_path / "fused.safetensors"
    assert message in _one_error_line(_cli("--checkpoint", seg_checkpoint, "--clip", clip_file, "--out", out))
    assert not out.exists() and not out.with_suffix(".json").exists() and not list(tmp_path.glob(".fused*"))


@pytest.mark.parametrize("case", ["same_as_input", "suffix", "weight"])
def test_cli_bad_arguments(case, seg_checkpoint, finetuned_file, tmp_path):
    out, extra, message = {
        "same_as_input": (seg_checkpoint, [], "would overwrite the input"),
        "suffix": (tmp_path / "fused.pth", [], "must be a .safetensors file"),
        "weight": (tmp_path / "fused.safetensors", ["--ensemble-weight", "1.5"], "ensemble weight must be in [0, 1]"),
    }[case]
    before = seg_checkpoint.stat().st_mtime_ns
    assert message in _one_error_line(_cli("--checkpoint", seg_checkpoint, "--clip", finetuned_file, "--out", out, *extra))
    assert seg_checkpoint.stat().st_mtime_ns == before
    assert not (tmp_path / "fused.safetensors").exists() and not (tmp_path / "fused.pth").exists()


def test_read_finetuned_clip_drops_the_original_tower(finetuned_file, seeds):
    state = read_finetuned_clip(finetuned_file)
    assert state.keys() == seeds[1].clip.state_dict().keys()
    with pytest.raises(FuseError, match="not found"):
        read_finetuned_clip(finetuned_file.with_name("absent.safetensors"))

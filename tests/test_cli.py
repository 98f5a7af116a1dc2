"""The `scan` command: outputs, and clear one-line errors with nothing half-written."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cli import app
from runtime.synthetic import synthetic_scene

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {result.stderr!r}"
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.fixture()
def scene(tmp_path):
    path = tmp_path / "scene.png"
    Image.fromarray(synthetic_scene(96, 128, seed=1)).save(path)
    return path


def _segment(images, out, *extra):
    return _run("segment", *images, "--config", "tiny", "--vocab", "sky,grass,house", "--out", out, "--device", "cpu", *extra)


def test_segment_writes_label_overlay_and_logits(scene, tmp_path):
    out = tmp_path / "out"
    result = _segment([scene], out, "--save-logits", "--no-resize")
    assert result.exit_code == 0, result.output
    label = np.asarray(Image.open(out / "scene.png"))
    assert label.shape == (96, 128) and label.max() < 3
    overlay = Image.open(out / "scene_overlay.png")
    assert overlay.height >= 96 and overlay.width > 128  # legend to the right
    with np.load(out / "scene.npz") as data:
        assert data["sem_seg"].shape == (3, 96, 128) and data["sem_seg"].dtype == np.float32
        assert list(data["classes"]) == ["sky", "grass", "house"]
        assert np.array_equal(data["sem_seg"].argmax(0), label)


def test_several_images_and_no_resize(tmp_path):
    paths = []
    for i, size in enumerate([(40, 70), (33, 33)]):
        path = tmp_path / f"img{i}.png"
        Image.fromarray(synthetic_scene(*size, seed=i)).save(path)
        paths.append(path)
    out = tmp_path / "out"
    result = _segment(paths, out, "--no-resize", "--save-logits")
    assert result.exit_code == 0, result.output
    for path, size in zip(paths, [(40, 70), (33, 33)]):
        assert np.asarray(Image.open(out / f"{path.stem}.png")).shape == size


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "P"])
def test_image_modes_are_converted(tmp_path, mode):
    rgb = synthetic_scene(48, 64, seed=2)
    if mode == "I;16":
        image = Image.fromarray((rgb[..., 0].astype(np.uint16) * 257))
    elif mode == "P":
        image = Image.fromarray(rgb).convert("P")
    else:
        image = Image.fromarray(rgb).convert(mode)
    path = tmp_path / f"img_{mode.replace(';', '')}.png"
    image.save(path)
    result = _segment([path], tmp_path / "out", "--no-resize")
    assert result.exit_code == 0, result.output
    assert np.asarray(Image.open(tmp_path / "out" / f"{path.stem}.png")).shape == (48, 64)


def test_one_pixel_image(tmp_path):
    path = tmp_path / "dot.png"
    Image.fromarray(np.full((1, 1, 3), 200, np.uint8)).save(path)
    for extra in ([], ["--no-resize"]):
        out = tmp_path / f"out{len(extra)}"
        result = _segment([path], out, *extra)
        assert result.exit_code == 0, result.output
        assert np.asarray(Image.open(out / "dot.png")).shape == (1, 1)


def _assert_failed_cleanly(result, out, *needles):
    assert result.exit_code == 2, result.output
    line = _error_line(result)
    for needle in needles:
        assert needle in line, line
    assert not out.exists() or not any(out.iterdir()), f"partial outputs left in {out}"


def test_unreadable_and_truncated_images(scene, tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_text("this is not an image")
    out = tmp_path / "out"
    _assert_failed_cleanly(_segment([scene, junk], out), out, "junk.png")
    data = scene.read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[: len(data) // 2])
    _assert_failed_cleanly(_segment([scene, cut], out), out, "cut.png")
    _assert_failed_cleanly(_segment([tmp_path / "missing.png"], out), out, "not found")


@pytest.mark.parametrize("vocab, needle", [("", "empty vocabulary"), (",,", "empty vocabulary"), ("cat,dog,cat", "duplicate"),
                                           ("missing.txt", "not found")])
def test_bad_vocabularies(scene, tmp_path, vocab, needle):
    out = tmp_path / "out"
    result = _run("segment", scene, "--config", "tiny", "--vocab", vocab, "--out", out)
    _assert_failed_cleanly(result, out, needle)


def test_missing_checkpoint(scene, tmp_path):
    out = tmp_path / "out"
    result = _segment([scene], out, "--checkpoint", tmp_path / "nope.pth")
    _assert_failed_cleanly(result, out, "checkpoint not found")


def test_checkpoint_that_does_not_fit(scene, tmp_path):
    import torch

    bad = tmp_path / "bad.pth"
    torch.save({"model": {"backbone.patch_embed.proj.weight": torch.zeros(7, 3, 4, 4), "foo.bar": torch.zeros(1)}}, bad)
    out = tmp_path / "out"
    result = _segment([scene], out, "--checkpoint", bad)
    _assert_failed_cleanly(result, out, "backbone.patch_embed.proj.weight", "foo.bar", "missing")


def test_yaml_with_unknown_clip_model(scene, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("MODEL:\n  META_ARCHITECTURE: SCAN\n  CLIP_ADAPTER:\n    CLIP_MODEL_NAME: ViT-Q-7\n")
    out = tmp_path / "out"
    result = _run("segment", scene, "--config", cfg, "--vocab", "a,b", "--out", out)
    _assert_failed_cleanly(result, out, "ViT-Q-7", "ViT-B-16")


def test_output_path_is_a_file(scene, tmp_path):
    out = tmp_path / "taken"
    out.write_text("")
    result = _segment([scene], out)
    assert result.exit_code == 2 and "not a folder" in _error_line(result)


def test_vocab_file_and_preset(scene, tmp_path):
    names = tmp_path / "names.json"
    names.write_text(json.dumps(["sky", "tree"]))
    out = tmp_path / "out"
    result = _run("segment", scene, "--config", "tiny", "--vocab", names, "--out", out, "--save-logits")
    assert result.exit_code == 0, result.output
    with np.load(out / "scene.npz") as data:
        assert list(data["classes"]) == ["sky", "tree"]


def test_convert_and_segment_with_converted(official_dev, tmp_path):
    out = tmp_path / "ours"
    result = _run("convert", official_dev.root / "model.pth", "--config", official_dev.root / "config.yaml", "--out", out)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "ours.safetensors").is_file() and (tmp_path / "ours.json").is_file()


def test_demo(tmp_path, tiny_bundle):
    """The main job's runtime half on the session bundle (training, evaluation and export have their own tests)."""
    out = tmp_path / "demo"
    result = _run("demo", "--out", out, "--bundle", tiny_bundle.path, "--runs", "1", "--images", "8")
    assert result.exit_code == 0, result.output
    inputs = sorted((out / "input").iterdir())
    assert len(inputs) == 2 and (out / "data" / "classes.json").is_file()
    for image in inputs:
        for suffix in (".png", "_overlay.png", ".npz"):
            assert (out / f"{image.stem}{suffix}").is_file(), image.stem + suffix
        assert Image.open(out / f"{image.stem}.png").mode == "L"
    for name in ("bench.json", "bench.md", "bench.png", "eval_bundle.json", "demo_summary.json"):
        assert (out / name).is_file(), name
    bench = json.loads((out / "bench.json").read_text())
    assert set(bench["backends"]) == {"eager", "onnxruntime", "openvino", "onnxruntime-int8"}
    assert bench["machine"]["cpu_features"].keys() == {"AVX2", "AVX-512", "VNNI", "BF16", "AMX"}
    assert bench["backends"]["onnxruntime"]["label_agreement"]["min"] >= 0.999
    assert "| onnxruntime-int8 |" in result.output  # the table is printed
    summary = json.loads((out / "demo_summary.json").read_text())
    assert 0.0 <= summary["bundle"]["mIoU"] <= 100.0


def test_output_would_overwrite_input(scene):
    result = _segment([scene], scene.parent)
    assert result.exit_code == 2 and "overwrite" in _error_line(result)
    assert Image.open(scene).mode == "RGB"


def test_doctor_reports_each_backend_cpu_features_and_the_default():
    """One line per backend (its state after the name), the CPU's vector features and the default choice."""
    import re

    from runtime.cpu import cpu_info

    result = _run("doctor")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    for name in ("eager", "onnxruntime", "openvino", "tensorrt", "cuda"):
        assert any(re.match(rf"\s+{name}\s+\S", line) for line in lines), f"no {name} line"
    cpu = next(line for line in lines if re.match(r"\s+cpu\s", line))
    for feature, present in cpu_info().features().items():
        assert f"{feature} {'yes' if present else 'no'}" in cpu
    assert any(re.match(r"\s+default\s+--backend \w+ --precision \w+ \(", line) for line in lines)

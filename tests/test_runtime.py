"""`runtime.Segmenter` on the session's `tiny` bundle: equal to eager, settings per call, text, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import PROJECT_ROOT
from runtime.errors import BundleError, ScanError
from runtime.segmenter import Segmenter
from runtime.settings import InferenceSettings, benchmark_settings
from runtime.synthetic import synthetic_scene
from runtime.vocab import VocabularyError
from scan_model.segmenter import EagerSegmenter

NAMES = ["sky", "grass", "house", "sun", "ball"]
AGREEMENT = 0.999  # DESIGN.md: identical labels on >= 99.9% of pixels (fp32)


@pytest.fixture(scope="module")
def runtime_segmenter(tiny_bundle, tmp_path_factory):
    segmenter = Segmenter(tiny_bundle.path, backend="onnxruntime", resize=False, cache_dir=tmp_path_factory.mktemp("text_cache"))
    segmenter.set_vocabulary(NAMES)
    return segmenter


@pytest.fixture(scope="module")
def eager_segmenter(tiny_model):
    segmenter = EagerSegmenter(tiny_model, resize=False)
    segmenter.set_vocabulary(NAMES)
    return segmenter


def _agreement(a, b) -> float:
    assert a.shape == b.shape
    return float((a == b).mean())


@pytest.mark.parametrize("size", [(96, 128), (70, 101), (128, 96)])  # one non-square, one needing padding
def test_labels_equal_eager(runtime_segmenter, eager_segmenter, size):
    image = synthetic_scene(*size, seed=3)
    ours = runtime_segmenter.segment(image, return_scores=True)
    ref = eager_segmenter.segment(image, return_scores=True)
    agreement = _agreement(ours.label_map, ref.label_map)
    rel = float(np.abs(ours.sem_seg - ref.sem_seg).max() / np.abs(ref.sem_seg).max())
    print(f"{size}: labels {agreement:.5f}, sem_seg rel {rel:.1e}, regions {ours.num_regions}/{ref.num_regions}")
    assert agreement >= AGREEMENT and rel < 1e-3
    assert ours.num_regions == ref.num_regions and ours.model_input_size == size
    assert set(ours.timings) >= {"preprocess", "image_encoder", "mask_decoder", "clip_adapter", "postprocess"}


def test_two_benchmark_settings_on_one_bundle(runtime_segmenter, eager_segmenter):
    """One bundle serves every benchmark: the replace ratio, threshold, weight and log branch are per call."""
    image = synthetic_scene(128, 160, seed=5)
    outputs = {}
    for benchmark in ("pc59", "ade847"):  # ratio 0.05 / 0.05, log ensemble off / on, other thresholds
        settings = InferenceSettings(**benchmark_settings("vitb", benchmark))
        ours = runtime_segmenter.segment(image, return_scores=True, settings=settings)
        ref = eager_segmenter.segment(image, return_scores=True, settings=settings)
        agreement = _agreement(ours.label_map, ref.label_map)
        print(f"{benchmark}: {settings}: labels {agreement:.5f}")
        assert agreement >= AGREEMENT
        outputs[benchmark] = ours.sem_seg
    assert np.abs(outputs["pc59"] - outputs["ade847"]).max() > 1e-3  # the settings did change the result
    ratios = {}
    for ratio in (0.0, 0.5):
        ours = runtime_segmenter.segment(image, return_scores=True, replace_ratio=ratio)
        ref = eager_segmenter.segment(image, return_scores=True, replace_ratio=ratio)
        assert _agreement(ours.label_map, ref.label_map) >= AGREEMENT
        ratios[ratio] = ours.sem_seg
    assert np.abs(ratios[0.0] - ratios[0.5]).max() > 1e-4  # the ratio reaches the graph


def test_official_shift_rule_is_seeded_and_random(runtime_segmenter):
    image = synthetic_scene(96, 128, seed=6)
    first = Segmenter(runtime_segmenter.root, backend="onnxruntime", resize=False, cache_dir=None)
    first.set_vocabulary(NAMES)
    a = first.segment(image, return_scores=True, shift_rule="official", replace_ratio=0.5).sem_seg
    again = Segmenter(runtime_segmenter.root, backend="onnxruntime", resize=False)
    again.set_vocabulary(NAMES)
    b = again.segment(image, return_scores=True, shift_rule="official", replace_ratio=0.5).sem_seg
    c = again.segment(image, return_scores=True, shift_rule="official", replace_ratio=0.5).sem_seg
    assert np.array_equal(a, b)  # same seed, same first draw
    assert not np.array_equal(b, c)  # a fresh draw per call, as the official rule samples per call


def test_segment_batch_and_resize(tiny_bundle):
    segmenter = Segmenter(tiny_bundle.path, backend="onnxruntime")
    segmenter.set_vocabulary("voc20")
    images = [synthetic_scene(48, 64, seed=1), synthetic_scene(64, 48, seed=2)]
    results = segmenter.segment_batch(images)
    assert [r.label_map.shape for r in results] == [(48, 64), (64, 48)]
    assert [r.model_input_size for r in results] == [(640, 853), (853, 640)]  # the official test resize
    assert segmenter.text_encoder_calls == 0  # voc20 comes from the bundle's cache


def test_runtime_needs_no_torch(tiny_bundle, tmp_path):
    """A fresh interpreter imports `runtime`, loads the bundle, sets a vocabulary and segments: no torch."""
    script = f"""
import sys
import runtime
from runtime.synthetic import synthetic_scene
segmenter = runtime.Segmenter({str(tiny_bundle.path)!r}, backend="onnxruntime", cache_dir={str(tmp_path)!r})
segmenter.set_vocabulary(["sky", "grass", "house"])
result = segmenter.segment(synthetic_scene(64, 96, seed=1))
assert result.label_map.shape == (64, 96), result.label_map.shape
banned = [m for m in ("torch", "open_clip", "scan_model", "export", "onnx") if m in sys.modules]
assert not banned, banned
print("ok", sorted(result.timings))
"""
    result = subprocess.run([sys.executable, "-c", script], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.startswith("ok"), result.stderr[-3000:]


# -- bad input -----------------------------------------------------------------------------


def _copy(bundle, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(bundle, target)
    return target


def test_missing_and_altered_files_are_named(tiny_bundle, tmp_path):
    copy = _copy(tiny_bundle.path, tmp_path)
    (copy / "mask_decoder.onnx").unlink()
    with pytest.raises(BundleError, match="missing mask_decoder.onnx"):
        Segmenter(copy, backend="onnxruntime")
    shutil.copyfile(tiny_bundle.path / "mask_decoder.onnx", copy / "mask_decoder.onnx")
    data = bytearray((copy / "clip_adapter.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "clip_adapter.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="clip_adapter.onnx does not match its sha256"):
        Segmenter(copy, backend="onnxruntime")
    with open(copy / "clip_adapter.onnx", "ab") as handle:
        handle.write(b"x")
    with pytest.raises(BundleError, match="clip_adapter.onnx has .* bytes"):
        Segmenter(copy, backend="onnxruntime", verify="size")


@pytest.mark.parametrize("change, needle", [
    (lambda m: m.update(schema_version=99), "newer than this scan-deploy reads"),
    (lambda m: m.update(schema_version=1), "re-export the bundle"),
    (lambda m: m["pieces"]["image_encoder"].pop("sha256"), "'pieces.image_encoder.sha256' is missing"),
    (lambda m: m["inference"].update(mask_threshold="high"), "'inference.mask_threshold' should be a number"),
])
def test_manifest_problems_are_one_line(tiny_bundle, tmp_path, change, needle):
    copy = _copy(tiny_bundle.path, tmp_path)
    manifest = json.loads((copy / "manifest.json").read_text())
    change(manifest)
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=needle) as info:
        Segmenter(copy, backend="onnxruntime")
    assert "\n" not in str(info.value)


def test_image_extremes(runtime_segmenter, tiny_bundle):
    tiny = np.full((1, 1, 3), 200, dtype=np.uint8)
    result = runtime_segmenter.segment(tiny)
    assert result.label_map.shape == (1, 1)
    resized = Segmenter(tiny_bundle.path, backend="onnxruntime")
    resized.set_vocabulary(NAMES)
    big = np.zeros((10000, 10000, 3), dtype=np.uint8)
    big[:, 5000:] = (90, 160, 60)
    result = resized.segment(big)
    assert result.label_map.shape == (10000, 10000) and result.model_input_size == (640, 640)
    with pytest.raises(ScanError, match="exceeds 2560 pixels"):
        runtime_segmenter.segment(np.zeros((3000, 100, 3), dtype=np.uint8))


def test_vocabulary_edge_cases(tiny_bundle, tmp_path):
    from runtime.manifest import read_manifest
    from runtime.text import TextEmbedder

    segmenter = Segmenter(tiny_bundle.path, backend="onnxruntime", cache_dir=tmp_path)
    with pytest.raises(VocabularyError, match="empty vocabulary"):
        segmenter.set_vocabulary("")
    with pytest.raises(ScanError, match="no vocabulary set"):
        segmenter.segment(synthetic_scene(32, 32))
    # 5000 names: encoding 70,000 prompts with the real text encoder would take a minute here and
    # is covered by tests/test_runtime_text.py; a stand-in encoder (seeded random features, not a
    # library mock) fills the user cache so that this test is about segmenting with K = 5000.
    names = [f"thing number {i}" for i in range(5000)]
    rng = np.random.default_rng(0)
    stand_in = TextEmbedder(tiny_bundle.path, read_manifest(tiny_bundle.path), lambda texts: np.zeros((len(texts), 77), np.int64),
                            lambda tokens: rng.standard_normal((tokens.shape[0], 64)).astype(np.float32), cache_dir=tmp_path)
    stand_in.embeddings(names)
    segmenter.set_vocabulary(names)
    assert segmenter.text_encoder_calls == 0  # every name came from the user cache
    result = segmenter.segment(synthetic_scene(96, 128, seed=2), return_scores=False)
    assert result.label_map.shape == (96, 128) and result.label_map.max() < 5000 and len(result.classes) == 5000


def test_doctor_on_a_damaged_manifest_is_one_line(tiny_bundle, tmp_path):
    from typer.testing import CliRunner

    from cli import app

    copy = _copy(tiny_bundle.path, tmp_path)
    healthy = CliRunner().invoke(app, ["doctor", "--bundle", str(copy)])
    assert healthy.exit_code == 0 and "files match their sizes and sha256" in healthy.output, healthy.output
    assert "pipeline (fp32) runtime labels identical to eager" in healthy.output
    (copy / "manifest.json").write_text('{"schema_version": 2, "pieces": [')
    result = CliRunner().invoke(app, ["doctor", "--bundle", str(copy)])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "damaged" in lines[0] and "Traceback" not in result.output


def test_atomic_write_gives_the_usual_file_mode(tmp_path):
    """Files written through a temporary (mkstemp: 0600) end with 0o666 less the umask, like open()."""
    import os

    from runtime.files import atomic_write

    old = os.umask(0o027)
    try:
        atomic_write(tmp_path / "a.bin", lambda tmp: tmp.write_bytes(b"x"))
        (tmp_path / "b.bin").write_bytes(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.bin").stat().st_mode & 0o777 == 0o640 == (tmp_path / "b.bin").stat().st_mode & 0o777
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind

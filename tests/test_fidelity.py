"""The whole model against the official implementation's recorded tensors.

Thresholds: every tensor up to the mask logits and the calibrated class logits within
1e-4 relative; region tensors where the thresholded masks agree; the final `sem_seg`
within 1e-3 relative.

On the dev case exactly one mask pixel sits within float rounding of MASK_THR (our
sigmoid 0.3999988, the official one just above 0.4): that query's crop gains a pixel,
its region-CLIP logits move by ~0.1 under the random fixture weights, and ~0.2% of the
argmax labels follow it. The harness therefore also measures a *conditioned* run in which
such near-threshold pixels are resolved to the official side; given identical threshold
decisions the argmax agrees on >= 99.99% of pixels.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from benchmarks.fidelity import compare_with_official
from conftest import PROJECT_ROOT, rel_diff

STRICT = 1e-4
FINAL = 1e-3
ARGMAX = 0.9999


@pytest.fixture(scope="module")
def report(official_dev):
    rep = compare_with_official(official_dev.root)
    print()
    for name, value in rep.rel.items():
        print(f"  {name:<46} {value:.2e}")
    print(f"  area flips: {rep.area_flips} queries, {rep.flipped_pixels} pixels; argmax agreement {rep.argmax_agreement:.6f}")
    return rep


def test_every_recorded_tensor_within_tolerance(report):
    too_far = {k: v for k, v in report.rel.items() if k != "sem_seg" and v > STRICT}
    assert not too_far, f"tensors beyond {STRICT}: {too_far}"
    expected_names = {
        "backbone.res5", "pixel_decoder.mask_features", "decoder.pred_masks", "orig_clip.final_cls_token",
        "text_features", "pred_logits.calibrated", "region_clip.image_features_unnorm", "derived.mask_cls_ensembled",
    }
    assert expected_names <= set(report.rel), f"not compared: {expected_names - set(report.rel)}"


def test_region_tensors_agree_where_masks_agree(report):
    assert report.exact["clip_adapter.valid_flag"]
    assert report.exact["clip_adapter.bboxes (agreeing masks)"]
    assert report.exact["clip_adapter.region_masks.firstN"]  # compared: the first N rows agree in area and box
    # A handful of threshold flips is float rounding; many would be a real difference.
    assert report.area_flips <= 3, f"{report.area_flips} masks changed area ({report.flipped_pixels} pixels)"
    assert report.compared_regions >= 95


RAW_ARGMAX = 0.995  # with the one near-threshold flip described above


def test_final_semantic_map(report):
    assert report.rel["sem_seg"] <= FINAL
    assert report.argmax_agreement >= RAW_ARGMAX
    # Every flip is a pixel within float rounding of the threshold ...
    assert report.near_threshold_flips
    # ... and once those decisions agree, so does everything downstream.
    assert all(v <= STRICT for k, v in report.conditioned_rel.items() if k != "sem_seg"), report.conditioned_rel
    assert report.conditioned_rel["sem_seg"] <= FINAL
    assert report.conditioned_argmax_agreement >= ARGMAX


def test_cli_reproduces_official_sem_seg(official_dev, tmp_path):
    root = official_dev.root
    cmd = [
        sys.executable, "-m", "cli", "segment", str(root / "image.png"),
        "--checkpoint", str(root / "model.pth"), "--config", str(root / "config.yaml"),
        "--vocab", str(root / "classes.json"), "--no-resize", "--save-logits", "--out", str(tmp_path), "--device", "cpu",
    ]
    done = subprocess.run(cmd, cwd=PROJECT_ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "image.npz") as data:
        sem_seg = torch.from_numpy(data["sem_seg"])
        assert list(data["classes"]) == official_dev.classes
    expected = official_dev.expected["sem_seg"]
    assert rel_diff(sem_seg, expected) <= FINAL
    label = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(tmp_path / "image.png"))
    agreement = float((torch.from_numpy(label.astype(np.int64)) == official_dev.expected["sem_seg.argmax"]).double().mean())
    assert agreement >= RAW_ARGMAX
    assert (tmp_path / "image_overlay.png").is_file()

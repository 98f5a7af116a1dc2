"""The eager segmenter API and the torch-free runtime modules."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import PROJECT_ROOT
from runtime.errors import ScanError
from runtime.synthetic import synthetic_scene
from scan_model.loading import load_model
from scan_model.segmenter import EagerSegmenter


@pytest.fixture(scope="module")
def segmenter():
    return EagerSegmenter(load_model(None, "tiny", seed=0).model)


def test_inputs_of_every_kind_give_the_same_labels(segmenter, tmp_path):
    segmenter.set_vocabulary(["sky", "grass", "house"])
    array = synthetic_scene(60, 90, seed=4)
    path = tmp_path / "x.png"
    Image.fromarray(array).save(path)
    a = segmenter.segment(array)
    b = segmenter.segment(Image.fromarray(array))
    c = segmenter.segment(path)
    assert a.label_map.shape == (60, 90) and a.model_input_size == (640, 960)
    assert np.array_equal(a.label_map, b.label_map) and np.array_equal(a.label_map, c.label_map)
    assert set(a.timings) >= {"preprocess", "image_encoder", "mask_decoder", "clip_adapter", "ensemble", "postprocess"}


def test_vocabulary_cache_encodes_only_new_names(segmenter):
    calls = []
    original = segmenter.model.encode_text

    def counting(names, **kwargs):
        calls.append(list(names))
        return original(names, **kwargs)

    segmenter.model.encode_text = counting
    try:
        segmenter.set_vocabulary(["sky", "grass", "house"])
        segmenter.set_vocabulary(["house", "sky"])
        segmenter.set_vocabulary(["sky", "tree"])
    finally:
        del segmenter.model.encode_text
    assert calls == [["tree"]]  # the first three were cached by the previous test


def test_deterministic_and_official_shift_rules(segmenter):
    image = synthetic_scene(64, 64, seed=5)
    segmenter.set_vocabulary(["sky", "grass", "house"])
    before = segmenter.model.cfg.inference.settings()
    first = segmenter.segment(image, return_scores=True, replace_ratio=0.5).sem_seg
    again = segmenter.segment(image, return_scores=True, replace_ratio=0.5).sem_seg
    assert np.array_equal(first, again)  # deterministic rule: same result every time
    official = segmenter.segment(image, return_scores=True, replace_ratio=0.5, shift_rule="official").sem_seg
    assert official.shape == first.shape and not np.array_equal(official, first)
    assert segmenter.model.cfg.inference.settings() == before  # settings of a call never stick


def test_segment_needs_a_vocabulary():
    seg = EagerSegmenter(load_model(None, "tiny", seed=0).model)
    with pytest.raises(ScanError, match="set_vocabulary"):
        seg.segment(np.zeros((8, 8, 3), np.uint8))


def test_runtime_modules_do_not_import_torch():
    code = (
        "import sys, runtime.images, runtime.vocab, runtime.visualize, runtime.outputs; "
        "assert 'torch' not in sys.modules, 'torch was imported'; print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_no_mask_above_threshold_falls_back_to_in_vocabulary_scores(segmenter):
    # The official adapter crashes here (SPEC §8 B3); we keep every query with out-vocab 1.
    inf = segmenter.model.cfg.inference
    segmenter.set_vocabulary(["sky", "grass", "house"])
    old = inf.mask_threshold
    try:
        inf.mask_threshold = 0.999999
        result = segmenter.segment(synthetic_scene(32, 32, seed=6), return_scores=True)
    finally:
        inf.mask_threshold = old
    assert result.num_regions == 0
    assert np.isfinite(result.sem_seg).all() and result.label_map.shape == (32, 32)


def test_oversized_image_without_resize_is_refused(segmenter):
    from runtime.images import ImageError

    segmenter.set_vocabulary(["sky", "grass", "house"])
    segmenter.resize = False
    try:
        with pytest.raises(ImageError, match="2560"):
            segmenter.segment(np.zeros((8, 3000, 3), np.uint8))
    finally:
        segmenter.resize = True

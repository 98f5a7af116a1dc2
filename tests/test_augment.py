"""The training augmentation of SPEC §3.1: shapes, padding, resize, crop rule, jitter, flip, targets."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from runtime.errors import ScanError
from scan_model.training.augment import (
    AugmentConfig,
    AugmentError,
    _hsv_to_rgb,
    _rgb_to_hsv,
    augment,
    targets_from_label,
)

PLAIN = dict(color_jitter=False, flip_prob=0.0)


def _pair(h: int, w: int, seed: int = 0, n_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8), rng.integers(0, n_classes, (h, w))


def _extent(label: np.ndarray, ignore: int = 255) -> tuple[int, int]:
    """Height and width of the non-padded top-left block (the label there holds no ignore)."""
    rows, cols = np.nonzero(label != ignore)
    return rows.max() + 1, cols.max() + 1


def test_output_is_crop_size_padded_with_128_and_ignore():
    image, label = _pair(100, 150)
    cfg = AugmentConfig(min_sizes=(200,), crop_size=(640, 640))
    out_image, out_label = augment(image, label, cfg, np.random.default_rng(0))
    assert out_image.shape == (640, 640, 3) and out_image.dtype == np.uint8
    assert out_label.shape == (640, 640) and out_label.dtype == np.int64
    assert _extent(out_label) == (200, 300)
    assert (out_image[200:] == 128).all() and (out_image[:, 300:] == 128).all()
    assert (out_label[200:] == 255).all() and (out_label[:, 300:] == 255).all()
    assert (out_label[:200, :300] != 255).all()


def test_short_side_is_one_of_min_sizes_and_aspect_kept():
    cfg = AugmentConfig(crop_size=(4000, 4000), max_size=100_000, **PLAIN)
    seen = set()
    for seed in range(12):
        h, w = (int(v) for v in np.random.default_rng(100 + seed).integers(40, 100, 2))
        image, label = _pair(h, w, seed)
        eh, ew = _extent(augment(image, label, cfg, np.random.default_rng(seed))[1])
        assert min(eh, ew) in cfg.min_sizes
        assert abs(max(eh, ew) - max(h, w) * min(eh, ew) / min(h, w)) <= 0.5
        seen.add(min(eh, ew))
    assert len(seen) > 3  # the short side is drawn per image, not fixed


def test_max_size_caps_the_long_side():
    image, label = _pair(100, 400)
    cfg = AugmentConfig(min_sizes=(640,), max_size=1000, crop_size=(1200, 1200), **PLAIN)
    assert _extent(augment(image, label, cfg, np.random.default_rng(0))[1]) == (250, 1000)


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.int64])
def test_label_values_stay_exact_including_16_bit(dtype):
    image = np.zeros((90, 120, 3), np.uint8)
    label = np.zeros((90, 120), dtype)
    label[:, 30:60], label[:, 60:90], label[:, 90:] = 3, 846, 65535
    cfg = AugmentConfig(crop_size=(512, 512))
    seen: set[int] = set()
    for seed in range(6):
        values = set(np.unique(augment(image, label, cfg, np.random.default_rng(seed))[1]).tolist())
        assert values <= {0, 3, 846, 65535, 255}
        seen |= values
    assert {846, 65535} <= seen


def test_category_area_rule_prefers_mixed_crops():
    # 95% class 0; classes 1 and 2 in columns 47-48 and 49-51. An 8x8 crop has its largest
    # share < 0.5 only when it holds all five strip columns (x0 in 44..47, 4 of 93 offsets).
    image = np.zeros((100, 100, 3), np.uint8)
    label = np.zeros((100, 100), np.int64)
    label[:, 47:49], label[:, 49:52] = 1, 2

    def mixed_crops(max_area: float) -> int:
        cfg = AugmentConfig(min_sizes=(100,), crop_size=(8, 8), single_category_max_area=max_area, **PLAIN)
        hits = 0
        for seed in range(300):
            out = augment(image, label, cfg, np.random.default_rng(seed))[1]
            hits += np.bincount(out.ravel()).max() / out.size < 0.5
        return hits

    constrained, plain = mixed_crops(0.5), mixed_crops(1.0)
    assert plain < 30  # ~4% of uniform crops qualify
    assert constrained > 70  # ~36% after up to 10 tries


def test_flip_mirrors_the_same_draw():
    image, label = _pair(120, 160, seed=3)
    cfg = AugmentConfig(crop_size=(300, 300), min_sizes=(256, 320), color_jitter=False)
    for seed in range(4):
        kept = augment(image, label, replace(cfg, flip_prob=0.0), np.random.default_rng(seed))
        flipped = augment(image, label, replace(cfg, flip_prob=1.0), np.random.default_rng(seed))
        assert not np.array_equal(kept[0], flipped[0])
        np.testing.assert_array_equal(flipped[0], np.fliplr(kept[0]))
        np.testing.assert_array_equal(flipped[1], np.fliplr(kept[1]))


def test_identity_settings_leave_the_pair_unchanged_and_flip_mirrors_it():
    image, label = _pair(48, 64, seed=7)
    cfg = AugmentConfig(min_sizes=(48,), crop_size=(48, 64), **PLAIN)
    out_image, out_label = augment(image, label, cfg, np.random.default_rng(0))
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_label, label)
    flipped = augment(image, label, replace(cfg, flip_prob=1.0), np.random.default_rng(0))
    np.testing.assert_array_equal(flipped[0], image[:, ::-1])
    np.testing.assert_array_equal(flipped[1], label[:, ::-1])


def test_same_seed_same_output_and_seeds_differ():
    image, label = _pair(200, 300, seed=1)
    cfg = AugmentConfig(crop_size=(256, 256))
    a = augment(image, label, cfg, np.random.default_rng(42))
    b = augment(image, label, cfg, np.random.default_rng(42))
    c = augment(image, label, cfg, np.random.default_rng(43))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_color_jitter_changes_colours_but_keeps_grey_grey():
    grey = np.repeat(np.linspace(0, 255, 64 * 64).astype(np.uint8).reshape(64, 64, 1), 3, axis=2)
    colour = _pair(64, 64, seed=5)[0]
    label = np.zeros((64, 64), np.int64)
    cfg = AugmentConfig(min_sizes=(64,), crop_size=(64, 64), flip_prob=0.0)
    changed = 0
    for seed in range(10):
        out = augment(grey, label, cfg, np.random.default_rng(seed))[0]
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
        changed += not np.array_equal(augment(colour, label, cfg, np.random.default_rng(seed))[0], colour)
    assert changed >= 7  # each image skips all five ops with probability ~1/32


def test_hsv_matches_opencv_uint8():
    # Reference values from cv2.cvtColor (OpenCV 4.14, vectorised path) on the same pixels.
    rgb = [[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [128, 64, 32], [10, 200, 90], [77, 77, 77], [3, 1, 2]]
    hsv = [[0, 255, 255], [60, 255, 255], [120, 255, 255], [30, 255, 255], [10, 191, 128], [73, 242, 200], [0, 0, 77],
           [165, 170, 3]]  # fmt: skip
    assert _rgb_to_hsv(np.array([rgb], np.uint8))[0].tolist() == hsv
    # HSV -> RGB truncates (55.83 -> 55 in the first pixel) as OpenCV's vectorised loop does.
    hsv = [[114, 142, 126], [7, 76, 19], [13, 145, 255], [174, 91, 230], [0, 0, 99], [179, 255, 255]]
    rgb = [[55, 69, 126], [19, 14, 13], [255, 172, 109], [230, 147, 164], [99, 99, 99], [255, 0, 8]]
    assert _hsv_to_rgb(np.array([hsv], np.uint8))[0].tolist() == rgb


def test_targets_from_label():
    label = np.array([[5, 5, 255], [2, 7, 5]])
    classes, masks = targets_from_label(label, ignore_label=255)
    assert classes.dtype == np.int64 and classes.tolist() == [2, 5, 7]
    assert masks.dtype == bool and masks.shape == (3, 2, 3)
    assert masks[1].tolist() == [[True, True, False], [False, False, True]]
    assert not masks.any(axis=0)[0, 2]  # the ignore pixel is in no mask
    classes, masks = targets_from_label(np.full((2, 2), 255), ignore_label=255)
    assert classes.shape == (0,) and masks.shape == (0, 2, 2)


def test_bad_inputs_raise_a_scan_error_naming_both_sizes():
    image, label = _pair(40, 50)
    with pytest.raises(AugmentError) as err:
        augment(image, label[:30], AugmentConfig(), np.random.default_rng(0))
    assert isinstance(err.value, ScanError) and isinstance(err.value, ValueError)
    assert "30x50" in str(err.value) and "40x50" in str(err.value)
    with pytest.raises(AugmentError):
        augment(image.astype(np.float32), label, AugmentConfig(), np.random.default_rng(0))
    with pytest.raises(AugmentError):
        augment(image, label.astype(np.float64), AugmentConfig(), np.random.default_rng(0))

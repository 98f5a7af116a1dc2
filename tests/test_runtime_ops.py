"""The numpy pre/post-processing (runtime.preprocess, .resize, .postprocess) against its torch twins.

u = 2**-24 (float32 unit roundoff). Tolerances, each justified where it is asserted:
  preprocess     bit-identical: single IEEE float32 operations, the same on every host.
  bilinear       |ours - torch| <= 10u * R(|x|), R the same resize of |x| (logits may cancel;
                 for non-negative inputs that is 6e-7 relative; 4.7u seen).
  sigmoid        1e-6 relative (4 ulps seen).
  ensemble       8u * (1 + largest |log p| [+ 1 / (1 - p_void) in the log branch]) relative;
                 <= 1e-5 for logits of standard deviation 3.
  semantic map   2Qu * sum_q |s||p| (two float32 dot products of length Q in any order).
  labels         identical except where torch's top-2 margin is within those bounds, and at
                 most 0.1% of pixels (none seen).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from runtime.postprocess import (ensemble_class_scores, labels_from_scores, mask_probabilities, plan_labels, sigmoid,
                                 upsample_masks)
from runtime.preprocess import nearest_square, normalise_and_pad
from runtime.resize import axis_taps, resize_bilinear, thread_count
from scan_model import ensemble as eager
from scan_model.config import SWIN_PIXEL_MEAN, SWIN_PIXEL_STD
from scan_model.model import ScanModel
from scan_model.regions import clip_pixel_stats
from scan_model.segmenter import _postprocess

F32 = np.float32
U = 2.0**-24
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def _torch_resize(x: np.ndarray, size) -> np.ndarray:
    return F.interpolate(torch.from_numpy(x)[None], size=size, mode="bilinear", align_corners=False)[0].numpy()


def _resize_bound(x: np.ndarray, size) -> np.ndarray:
    """10u * R(|x|). With the same taps and weights, each pass of ours rounds two products and
    their sum (3u of the pass's |x|-weighted sum), PyTorch's fused x0 * w0 + fl(x1 * w1) two
    (2u); the width pass's error goes through the height pass with weights summing to 1. So
    ours is within 6u * R(|x|) of the exact value, PyTorch's within 4u."""
    return 10 * U * _torch_resize(np.abs(x).astype(np.float64), size)


def _dyadic(rng, shape, levels=64) -> np.ndarray:
    """Values k / levels: products and short sums are exact, so every summation order agrees."""
    return (rng.integers(0, levels, shape) / levels).astype(F32)


def test_runtime_modules_do_not_import_torch():
    code = (
        "import sys, runtime.preprocess, runtime.resize, runtime.postprocess\n"
        "bad = [m for m in ('torch', 'scan_model', 'export') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stderr


# -- preprocess: bit-identical ----------------------------------------------------------------


def _model_stub(clip_size: int = 224, divisibility: int = 32) -> SimpleNamespace:
    """What ScanModel.normalise_and_pad / clip_input read from self, built as ScanModel does."""
    clip_mean, clip_std = clip_pixel_stats()
    return SimpleNamespace(
        cfg=SimpleNamespace(inference=SimpleNamespace(size_divisibility=divisibility),
                            clip=SimpleNamespace(vision={"image_size": clip_size})),
        pixel_mean=torch.tensor(SWIN_PIXEL_MEAN, dtype=torch.float32).reshape(3, 1, 1),
        pixel_std=torch.tensor(SWIN_PIXEL_STD, dtype=torch.float32).reshape(3, 1, 1),
        clip_mean=clip_mean.reshape(3, 1, 1),
        clip_std=clip_std.reshape(3, 1, 1),
    )


@pytest.mark.parametrize("height,width,divisibility", [(1, 1, 32), (31, 33, 32), (7, 300, 7), (480, 640, 32), (640, 853, 1)])
def test_normalise_and_pad_is_bit_identical(height, width, divisibility):
    """A subtraction and a division, one IEEE rounding each on every host: no tolerance."""
    image = np.random.default_rng(height * 1000 + width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    swin_ref, clip_ref = ScanModel.normalise_and_pad(_model_stub(divisibility=divisibility),
                                                     torch.from_numpy(image).permute(2, 0, 1)[None].float())
    clip_mean, clip_std = clip_pixel_stats()
    swin = normalise_and_pad(image, np.asarray(SWIN_PIXEL_MEAN, F32), np.asarray(SWIN_PIXEL_STD, F32), divisibility)
    assert swin.dtype == np.float32 and swin.shape[2] % divisibility == 0 and swin.shape[3] % divisibility == 0
    np.testing.assert_array_equal(swin, swin_ref.numpy())
    clip = normalise_and_pad(image, clip_mean.numpy(), clip_std.numpy(), divisibility)
    np.testing.assert_array_equal(clip, clip_ref.numpy())
    assert not swin[..., height:, :].any() and not swin[..., :, width:].any()  # zero in normalised units


@pytest.mark.parametrize("height,width,size", [(32, 32, 224), (640, 864, 224), (1, 1, 224), (300, 7, 16), (64, 96, 5)])
def test_nearest_square_is_bit_identical(height, width, size):
    """Source index floor(d * scale), one float32 product: no tolerance."""
    rng = np.random.default_rng(size + height)
    padded = rng.standard_normal((1, 3, height, width)).astype(F32)
    reference = ScanModel.clip_input(_model_stub(clip_size=size), torch.from_numpy(padded))
    np.testing.assert_array_equal(nearest_square(padded, size), reference.numpy())
    wide = rng.standard_normal((2, 5, height, width)).astype(F32)
    reference = F.interpolate(torch.from_numpy(wide), size=(size, size), mode="nearest")
    np.testing.assert_array_equal(nearest_square(wide, size), reference.numpy())


# -- bilinear ------------------------------------------------------------------------------

RESIZE_CASES = [  # (C, h, w, H, W): up, down, non-square, odd, identity axes, 1x1 in and out, many channels
    (5, 37, 53, 300, 401), (4, 160, 160, 640, 640), (7, 100, 80, 63, 90), (2, 31, 29, 201, 77),
    (6, 50, 40, 50, 40), (4, 7, 300, 7, 100), (4, 300, 7, 90, 7), (1, 1, 1, 5, 7), (2, 1, 5, 1, 1),
    (20, 37, 53, 60, 61), (100, 8, 9, 64, 64), (13, 1, 1, 70, 90), (3, 160, 213, 640, 851),
]


@pytest.mark.parametrize("channels,h,w,out_h,out_w", RESIZE_CASES)
def test_resize_bilinear_matches_torch(channels, h, w, out_h, out_w):
    x = (np.random.default_rng(channels * 7 + h).standard_normal((channels, h, w)) * 5).astype(F32)
    full = resize_bilinear(x, (out_h, out_w))
    assert full.shape == (channels, out_h, out_w) and full.dtype == np.float32
    assert np.all(np.abs(full - _torch_resize(x, (out_h, out_w))) <= _resize_bound(x, (out_h, out_w)))
    # bands and windows are the same arithmetic as the whole: bit-identical
    cut, col = out_h // 3, out_w // 2
    np.testing.assert_array_equal(resize_bilinear(x, (out_h, out_w), rows=slice(cut, out_h)), full[:, cut:])
    np.testing.assert_array_equal(resize_bilinear(x, (out_h, out_w), rows=slice(out_h - 1, out_h)), full[:, -1:])
    window = resize_bilinear(x, (out_h, out_w), rows=slice(cut, cut + 1), cols=slice(col, None))
    np.testing.assert_array_equal(window, full[:, cut : cut + 1, col:])


def test_resize_bilinear_rounds_the_source_coordinate_once():
    """An alternating input makes every weight visible: |x[i1] - x[i0]| = 2 at |x| = 1.

    A coordinate rounded twice (float32 product, then float32 difference) moves some weights by
    ulp(s), hence outputs by ~ulp(s) * 2 >> 10u: the bound must catch it, and ours must not.
    """
    x = np.where(np.arange(300) % 2, F32(1), F32(-1)).astype(F32)[None, None, :].repeat(2, axis=1)
    size = (2, 2003)
    expected = _torch_resize(x, size)
    assert np.all(np.abs(resize_bilinear(x, size) - expected) <= _resize_bound(x, size))
    scale = F32(300) / F32(2003)
    twice = np.maximum((np.arange(2003, dtype=F32) + F32(0.5)) * scale - F32(0.5), F32(0))
    lo = twice.astype(np.int64)
    naive = x[0, 0, lo] * (F32(1) - (twice - lo)) + x[0, 0, np.minimum(lo + 1, 299)] * (twice - lo)
    assert np.any(twice != axis_taps(300, 2003).w_hi + axis_taps(300, 2003).lo)
    assert np.any(np.abs(naive - expected[0, 0]) > _resize_bound(x, size)[0, 0])


def test_resize_bilinear_rejects_bad_windows():
    x = np.zeros((1, 4, 4), F32)
    with pytest.raises(ValueError):
        resize_bilinear(x, (8, 8), rows=slice(0, 8, 2))
    with pytest.raises(ValueError):
        resize_bilinear(x, (0, 8))
    assert resize_bilinear(x, (8, 8), rows=slice(5, 5)).shape == (1, 0, 8)


@pytest.mark.parametrize("queries,h,w,padded,image", [
    (10, 160, 214, (640, 864), (640, 853)),  # the 640x853 image of a 640-short-side resize
    (100, 40, 54, (160, 224), (150, 213)),
    (1, 8, 8, (32, 32), (32, 32)),
    (3, 8, 10, (32, 40), (1, 1)),
    (20, 2, 2, (8, 8), (5, 7)),
])
def test_upsample_masks_matches_torch(queries, h, w, padded, image):
    logits = (np.random.default_rng(queries + h).standard_normal((queries, h, w)) * 8).astype(F32)
    expected = eager.upsample_masks(torch.from_numpy(logits)[None], padded, image)[0].numpy()
    got = upsample_masks(logits, padded, image)
    assert got.shape == (queries, *image) and got.dtype == np.float32
    assert np.all(np.abs(got - expected) <= _resize_bound(logits, padded)[:, : image[0], : image[1]])
    with pytest.raises(ValueError):
        upsample_masks(logits, padded, (padded[0] + 1, 1))


# -- sigmoid ---------------------------------------------------------------------------------


def test_sigmoid_matches_torch_without_warnings():
    """1e-6 relative: numpy's float32 exp is within 2.52 ulps (its SIMD builds; libm's better),
    SLEEF's (PyTorch) within 1; an exp error reaches 1 + e scaled by e / (1 + e) < 1, then 1 + e
    and 1 / (1 + e) round once each: <= 3.52 and 2 ulps of 2**-23 from exact (4 ulps seen).
    Where exp(-x) nears float32's range (x < -87) either may flush to 0: absolute 2**-126."""
    rng = np.random.default_rng(5)
    x = np.concatenate([rng.standard_normal(1 << 19) * 12, np.linspace(-110, 110, 1 << 19)]).astype(F32)
    expected = torch.sigmoid(torch.from_numpy(x)).numpy()
    with warnings.catch_warnings(), np.errstate(all="raise"):
        warnings.simplefilter("error")
        got = sigmoid(x)
        special = sigmoid(np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, 3e38, -3e38, -1e4], F32))
    assert got.dtype == np.float32
    assert np.all(np.abs(got - expected) <= 1e-6 * expected + 2.0**-126)
    assert special[0] == 1 and special[1] == 0 and np.isnan(special[2]) and special[3] == special[4] == 0.5
    assert special[5] == 1 and special[6] == 0 and special[7] == 0


def test_sigmoid_in_place_and_strided():
    x = (np.random.default_rng(6).standard_normal((3, 40, 50)) * 5).astype(F32)
    expected = sigmoid(x)
    crop = x[:, :30, :45]
    np.testing.assert_array_equal(sigmoid(crop), expected[:, :30, :45])  # a non-contiguous view
    assert sigmoid(x, out=x) is x
    np.testing.assert_array_equal(x, expected)
    with pytest.raises(ValueError):
        sigmoid(x, out=np.empty((3, 40, 50), np.float64))
    assert sigmoid(np.float32(0)).shape == () and sigmoid(np.zeros((0, 3), F32)).shape == (0, 3)


# -- ensemble and semantic map -----------------------------------------------------------------


def _softmax64(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


ENSEMBLE_CASES = [  # (Q, K, weight, log_branch, fraction of valid queries, logit std)
    (100, 150, 0.7, False, 0.7, 3), (100, 150, 0.7, True, 0.7, 3), (10, 846, 0.75, True, 0.5, 3),
    (1, 459, 0.65, False, 1.0, 3), (1, 1, 0.35, False, 1.0, 3), (1, 1, 0.35, True, 1.0, 3),
    (5, 3, 0.0, False, 0.5, 3), (5, 3, 1.0, True, 0.5, 3),
    (8, 20, 0.6, False, 0.0, 3), (8, 20, 0.6, True, 0.0, 3),  # all invalid
    (50, 300, 0.8, False, 0.7, 8), (50, 300, 0.8, True, 0.7, 8),  # wide logits
]


@pytest.mark.parametrize("queries,classes,weight,log_branch,valid_fraction,std", ENSEMBLE_CASES)
def test_ensemble_class_scores_matches_torch(queries, classes, weight, log_branch, valid_fraction, std):
    """Ours is float64 rounded once; PyTorch's float32 pow (exp of w log p), log and exp err by
    ~u * |log p| relatively, and the log branch's 1 - p_void cancels as p_void nears 1
    (relative error 1.3u * condition seen without, 5.9u with the log branch)."""
    rng = np.random.default_rng(queries * classes + std)
    class_logits = (rng.standard_normal((queries, classes + 1)) * std).astype(F32)
    clip_logits = (rng.standard_normal((queries, classes + 1)) * std).astype(F32)
    valid = rng.random(queries) < valid_fraction
    expected = eager.ensemble_class_scores(torch.from_numpy(class_logits), torch.from_numpy(clip_logits),
                                           torch.from_numpy(valid), weight, log_branch).numpy()
    got = ensemble_class_scores(class_logits, clip_logits, valid, weight, log_branch)
    assert got.shape == (queries, classes) and got.dtype == np.float32
    probs = _softmax64(class_logits.astype(np.float64))
    region = np.abs(np.log(_softmax64(clip_logits[:, :-1].astype(np.float64)))).max(1)
    condition = 1 + np.maximum(np.abs(np.log(probs)).max(1), np.where(valid, region, 0))
    if log_branch:
        condition += 1 / (1 - probs[:, -1])
    relative = np.abs(got.astype(np.float64) - expected) / expected
    assert np.all(relative <= 8 * U * condition[:, None])
    if std <= 3:
        assert relative.max() <= 1e-5
    # rows of invalid queries ignore their region logits entirely
    clip_logits[~valid] = rng.standard_normal((int((~valid).sum()), classes + 1)) * 50
    np.testing.assert_array_equal(ensemble_class_scores(class_logits, clip_logits, valid, weight, log_branch), got)


def semantic_map(scores: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Reference (K, h, w) semantic map in one float32 matrix product: exact on dyadic inputs."""
    return (scores.T @ probs.reshape(probs.shape[0], -1)).reshape(-1, *probs.shape[1:])


def test_kept_scores_at_the_model_size_are_the_eager_semantic_map():
    """Without a resize, the scores `labels_from_scores` keeps are eager's semantic map: within
    float32 summation error, and bit for bit where every summation order is exact (dyadic)."""
    rng = np.random.default_rng(7)
    for queries, classes, h, w in [(100, 150, 40, 60), (1, 1, 1, 1), (100, 150, 1, 1), (7, 3, 33, 17), (100, 1, 5, 5)]:
        scores, probs = rng.random((queries, classes), dtype=F32), rng.random((queries, h, w), dtype=F32)
        expected = eager.semantic_map(torch.from_numpy(scores), torch.from_numpy(probs)).numpy()
        got = labels_from_scores(scores, probs, (h, w), keep_scores=True)[1]
        assert got.shape == (classes, h, w)
        assert np.all(np.abs(got - expected) <= 2 * queries * U * np.einsum("qc,qhw->chw", scores, probs))
        scores, probs = _dyadic(rng, scores.shape), _dyadic(rng, probs.shape)
        expected = eager.semantic_map(torch.from_numpy(scores), torch.from_numpy(probs)).numpy()
        np.testing.assert_array_equal(labels_from_scores(scores, probs, (h, w), keep_scores=True)[1], expected)


# -- labels ---------------------------------------------------------------------------------

LABEL_CASES = [  # (Q, K, h, w, H, W)
    (100, 150, 64, 86, 48, 64),  # down, non-square
    (100, 40, 40, 30, 123, 97),  # up, odd
    (10, 300, 16, 16, 40, 40),
    (4, 5, 30, 30, 30, 30),  # same size: no resize
    (20, 12, 37, 53, 37, 203),  # one axis only
    (1, 1, 8, 8, 21, 33),  # Q = 1, K = 1
    (6, 66, 1, 1, 40, 90),  # 1x1 model size
    (30, 7, 20, 25, 1, 1),  # 1x1 output
]


def _near_ties(sem: np.ndarray, margin: np.ndarray) -> np.ndarray:
    """(H, W) pixels whose best and second-best classes are within ``margin``."""
    if sem.shape[0] == 1:
        return np.zeros(sem.shape[1:], dtype=bool)
    top2 = np.partition(sem, sem.shape[0] - 2, axis=0)[-2:]
    return top2[1] - top2[0] <= margin


@pytest.mark.parametrize("queries,classes,h,w,out_h,out_w", LABEL_CASES)
def test_labels_from_scores_matches_torch(queries, classes, h, w, out_h, out_w):
    """Semantic maps differ by <= 2Qu * sem (non-negative inputs), the bilinear step adds 10u:
    labels may differ only where torch's top-2 margin is below twice that, and rarely do."""
    rng = np.random.default_rng(classes + h)
    scores = rng.random((queries, classes), dtype=F32)
    probs = sigmoid((rng.standard_normal((queries, h, w)) * 4).astype(F32))
    reference_map = eager.semantic_map(torch.from_numpy(scores), torch.from_numpy(probs))
    expected, sem, _ = _postprocess(reference_map, (out_h, out_w), True)
    best = np.full((out_h, out_w), np.nan, dtype=F32)
    labels, kept = labels_from_scores(scores, probs, (out_h, out_w), keep_scores=True, label_scores=best)
    # Each pixel's label score is its label's entry of the kept map (the running maximum).
    np.testing.assert_array_equal(best, np.take_along_axis(kept, labels[None], axis=0)[0])
    assert labels.dtype == np.int64 and labels.shape == (out_h, out_w) and kept.shape == sem.shape
    bound = (2 * queries + 10) * U * sem
    assert np.all(np.abs(kept - sem) <= bound)
    unsure = _near_ties(sem, 2 * bound.max(axis=0))
    differ = labels != expected
    assert not np.any(differ & ~unsure)
    assert differ.mean() <= 1e-3, f"{differ.sum()} of {differ.size} labels differ"
    np.testing.assert_array_equal(labels_from_scores(scores, probs, (out_h, out_w))[0], labels)  # without scores


@pytest.mark.parametrize("queries,classes,h,w,out_h,out_w",
                         [(20, 70, 24, 32, 77, 101), (5, 9, 30, 30, 30, 30), (8, 200, 40, 50, 13, 17)])
def test_labels_bands_and_chunks_equal_the_whole(queries, classes, h, w, out_h, out_w):
    """Dyadic inputs make the semantic map exact in any chunking: then bands of rows and chunks
    of classes must give exactly the argmax of the whole resized map (first index on ties)."""
    rng = np.random.default_rng(queries + classes)
    scores, probs = _dyadic(rng, (queries, classes), 4), _dyadic(rng, (queries, h, w), 4)  # many exact ties
    whole = resize_bilinear(semantic_map(scores, probs), (out_h, out_w))
    if (h, w) == (out_h, out_w):  # no resize: the map itself
        np.testing.assert_array_equal(whole, semantic_map(scores, probs))
    assert np.any(np.sort(whole, axis=0)[-1] == np.sort(whole, axis=0)[-2])  # ties are exercised
    budget = 1 << 12
    plan = plan_labels((h, w), (out_h, out_w), classes, budget)
    assert len(plan.parts) > 1 and plan.chunk < classes  # several tiles or bands, and chunks
    for budget_bytes in (budget, 256 << 20):
        labels, kept = labels_from_scores(scores, probs, (out_h, out_w), keep_scores=True, budget_bytes=budget_bytes)
        np.testing.assert_array_equal(kept, whole)
        np.testing.assert_array_equal(labels, np.argmax(whole, axis=0))
        np.testing.assert_array_equal(labels_from_scores(scores, probs, (out_h, out_w), budget_bytes=budget_bytes)[0], labels)


def test_labels_ties_keep_the_first_class_across_chunks():
    # Multiples of 1/16: every sum over queries is exact in float32 in any order, so the duplicate
    # class ties exactly on every CPU (BLAS kernels order the sums of different chunk shapes
    # differently; with arbitrary floats the two columns differ in the last bit on some CPUs).
    rng = np.random.default_rng(11)
    scores = (rng.integers(0, 16, (20, 30)) / 16).astype(F32)
    scores[:, 3] = (24 + rng.integers(0, 16, 20)) / 16  # a strong class...
    scores[:, 29] = scores[:, 3]  # ...and its duplicate, in another chunk
    probs = (rng.integers(0, 17, (20, 24, 32)) / 16).astype(F32)
    probs[:, :6] = 0  # rows where every class scores 0: label 0
    chunk = plan_labels((24, 32), (77, 101), 30, 1 << 16).chunk
    assert 3 // chunk != 29 // chunk  # 3 and 29 in different chunks
    labels = labels_from_scores(scores, probs, (77, 101), budget_bytes=1 << 16)[0]
    assert np.any(labels == 3) and not np.any(labels == 29)
    assert np.all(labels[:10] == 0)
    assert not labels_from_scores(scores[:, :1], probs, (7, 9))[0].any()  # K = 1


def _peak_working_bytes(function) -> tuple[object, int]:
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    try:
        result = function()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    return result, peak


@pytest.mark.parametrize("threads", [1, 8])
def test_labels_memory_is_bounded_with_5000_classes(threads):
    rng = np.random.default_rng(12)
    scores, probs = _dyadic(rng, (100, 5000)), _dyadic(rng, (100, 32, 48))
    out_size, budget = (120, 160), 32 << 20
    assert 5000 * out_size[0] * out_size[1] * 4 > 10 * budget  # the whole resized map: 384 MB
    (labels, _), peak = _peak_working_bytes(
        lambda: labels_from_scores(scores, probs, out_size, budget_bytes=budget, threads=threads))
    assert peak <= budget + labels.nbytes, f"peak {peak / 2**20:.1f} MiB"
    sem = semantic_map(scores, probs)  # exact (dyadic): labels must be its resized argmax
    for band in (slice(0, 8), slice(57, 63), slice(112, 120)):
        np.testing.assert_array_equal(labels[band], resize_bilinear(sem, out_size, rows=band).argmax(axis=0))


@pytest.mark.parametrize("threads", [1, 8])
def test_labels_memory_is_bounded_on_a_huge_output(threads):
    rng = np.random.default_rng(13)
    scores, probs = _dyadic(rng, (100, 20)), _dyadic(rng, (100, 160, 214))  # exact semantic map in any band
    out_size, budget = (10000, 10000), 256 << 20
    start = time.perf_counter()
    (labels, _), peak = _peak_working_bytes(
        lambda: labels_from_scores(scores, probs, out_size, budget_bytes=budget, threads=threads))
    elapsed = time.perf_counter() - start
    assert labels.shape == out_size
    assert peak <= budget + labels.nbytes, f"peak {peak / 2**20:.1f} MiB"
    assert elapsed < 30, f"{elapsed:.1f} s"
    sem = semantic_map(scores, probs)
    for first in (0, 4321, 9990):  # bands against the banded resize of the whole map
        band = slice(first, first + 10)
        np.testing.assert_array_equal(labels[band], resize_bilinear(sem, out_size, rows=band).argmax(axis=0))


@pytest.mark.parametrize("threads", [1, 8])
def test_mask_probabilities_memory_is_bounded(threads):
    """The threads' scratch together stays under the budget; the (Q, H, W) output is not counted."""
    logits = (np.random.default_rng(14).standard_normal((100, 160, 216)) * 4).astype(F32)
    budget = 16 << 20
    probs, peak = _peak_working_bytes(
        lambda: mask_probabilities(logits, (640, 864), (640, 853), threads=threads, budget_bytes=budget))
    assert peak <= budget + probs.nbytes, f"peak {(peak - probs.nbytes) / 2**20:.1f} MiB beyond the output"


# -- threads -----------------------------------------------------------------------------------


def test_thread_count_defaults_to_the_usable_cpus():
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert thread_count(None) == usable and thread_count(3) == 3
    with pytest.raises(ValueError):
        thread_count(0)


@pytest.mark.parametrize("image", [(640, 853), (150, 213), (1, 1)])
def test_masks_are_bit_identical_across_thread_counts(image):
    """Bands and blocks depend on the thread count; values never do. The fused sigmoid is the
    separate one, bit for bit (the same steps on contiguous blocks)."""
    padded = (-(-image[0] // 32) * 32, -(-image[1] // 32) * 32)
    logits = (np.random.default_rng(image[0]).standard_normal((37, padded[0] // 4, padded[1] // 4)) * 4).astype(F32)
    one = upsample_masks(logits, padded, image, threads=1)
    np.testing.assert_array_equal(upsample_masks(logits, padded, image, threads=3), one)
    np.testing.assert_array_equal(upsample_masks(logits, padded, image, threads=4, budget_bytes=1 << 16), one)
    probs = mask_probabilities(logits, padded, image, threads=1)
    np.testing.assert_array_equal(probs, sigmoid(one, threads=1))
    np.testing.assert_array_equal(mask_probabilities(logits, padded, image, threads=3), probs)
    np.testing.assert_array_equal(sigmoid(one, threads=3), probs)


@pytest.mark.parametrize("queries,classes,h,w,out_h,out_w,budget", [
    (100, 150, 160, 160, 160, 160, 256 << 20),  # no resize: tiles of pixels
    (100, 150, 40, 60, 160, 240, 256 << 20),  # up
    (50, 80, 90, 70, 31, 45, 256 << 20),  # down
    (20, 70, 24, 32, 77, 101, 1 << 16),  # many bands and chunks
    (20, 70, 30, 30, 30, 30, 1 << 14),  # many tiles and chunks
    (10, 40, 20, 30, 20, 77, 1 << 20),  # width only
])
def test_labels_are_bit_identical_across_thread_counts(queries, classes, h, w, out_h, out_w, budget):
    """Task shapes (the matrix products' among them) come from the sizes and the budget only:
    labels, kept scores and label scores are the same bits on 1 and on several threads."""
    rng = np.random.default_rng(queries + classes + out_w)
    scores = rng.random((queries, classes), dtype=F32)
    probs = sigmoid((rng.standard_normal((queries, h, w)) * 4).astype(F32))
    results = []
    for threads in (1, 2, 5):
        best = np.empty((out_h, out_w), F32)
        labels, kept = labels_from_scores(scores, probs, (out_h, out_w), keep_scores=True, budget_bytes=budget,
                                          label_scores=best, threads=threads)
        results.append((labels, kept, best))
    for labels, kept, best in results[1:]:
        np.testing.assert_array_equal(labels, results[0][0])
        np.testing.assert_array_equal(kept, results[0][1])
        np.testing.assert_array_equal(best, results[0][2])


def test_resize_bilinear_is_bit_identical_across_thread_counts():
    x = (np.random.default_rng(15).standard_normal((9, 37, 53)) * 5).astype(F32)
    one = resize_bilinear(x, (300, 401), threads=1)
    np.testing.assert_array_equal(resize_bilinear(x, (300, 401), threads=4, budget_bytes=1 << 14), one)


def test_labels_with_a_nan_class_follow_torch():
    """A NaN score counts as the maximum within a chunk (numpy's argmax, torch's max): the class
    wins every pixel when it is in the first chunk of both, and its score is NaN."""
    rng = np.random.default_rng(16)
    scores, probs = rng.random((10, 40), dtype=F32), rng.random((10, 12, 16), dtype=F32)
    scores[3, 5] = np.nan
    expected, _, expected_best = _postprocess(eager.semantic_map(torch.from_numpy(scores), torch.from_numpy(probs)),
                                              (30, 41), False)
    best = np.empty((30, 41), F32)
    labels, _ = labels_from_scores(scores, probs, (30, 41), label_scores=best)
    np.testing.assert_array_equal(labels, expected)
    assert np.all(labels == 5) and np.all(np.isnan(best)) and np.all(np.isnan(expected_best))

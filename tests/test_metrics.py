"""Metrics with the official conventions (SPEC 5.4, 5.5): hand-computed values, bincount, SG-IoU, maps, errors."""

from __future__ import annotations

import numpy as np
import pytest

from runtime.errors import ScanError
from runtime.metrics import ConfusionMatrix, MetricsError, segmentation_metrics, sg_iou_metrics, synonym_map

# K = 4 classes; rows = prediction, columns = ground truth, index 4 = ignored GT.
# class 0 and 1 are present; class 2 is predicted but absent from the GT; class 3 is neither.
HAND = np.array(
    [
        # gt: 0  1  2  3  ign
        [9, 2, 0, 0, 7],  # pred 0
        [1, 5, 0, 0, 0],  # pred 1
        [1, 3, 0, 0, 5],  # pred 2
        [0, 0, 0, 0, 0],  # pred 3
        [0, 0, 0, 0, 0],  # (pred K never happens)
    ]
)


def test_hand_computed_standard_metrics():
    # pos_gt   = [9+1+1, 2+5+3, 0, 0] = [11, 10, 0, 0]   (21 labelled pixels; the 12 ignored ones drop out)
    # pos_pred = [9+2, 1+5, 1+3, 0]   = [11, 6, 4, 0]    (not 18 and 9: ignored GT is excluded)
    # tp = [9, 5, 0, 0]; union0 = 11+11-9 = 13, union1 = 10+6-5 = 11
    # IoU0 = 9/13, IoU1 = 5/11; ACC0 = 9/11, ACC1 = 1/2
    # mIoU: classes 0, 1, 2 have pos_gt + pos_pred > 0 -> (9/13 + 5/11) / 3 = (99 + 65)/143/3 = 164/429
    # fwIoU = (9/13*11 + 5/11*10) / 21 = (1089 + 650)/143/21 = 1739/3003
    # mACC = (9/11 + 1/2) / 2 = 29/44; pACC = 14/21 = 2/3
    out = segmentation_metrics(HAND, class_names=["a", "b", "c", "d"])
    assert out["mIoU"] == pytest.approx(100 * 164 / 429)  # 38.228...
    assert out["mIoU"] != pytest.approx(100 * 164 / 286)  # newer detectron2 would divide by 2
    assert out["fwIoU"] == pytest.approx(100 * 1739 / 3003)  # 57.908...
    assert out["mACC"] == pytest.approx(100 * 29 / 44)  # 65.909...
    assert out["pACC"] == pytest.approx(100 * 2 / 3)
    assert out["num_classes"] == 4 and out["pixels"] == 21
    assert all(isinstance(out[k], float) for k in ("mIoU", "fwIoU", "mACC", "pACC"))
    a, b, c, d = out["per_class"]
    assert a == {"class": "a", "IoU": pytest.approx(100 * 9 / 13), "ACC": pytest.approx(100 * 9 / 11),
                 "gt_pixels": 11, "pred_pixels": 11}
    assert b["IoU"] == pytest.approx(100 * 5 / 11) and b["ACC"] == pytest.approx(50.0)
    assert c == {"class": "c", "IoU": None, "ACC": None, "gt_pixels": 0, "pred_pixels": 4}
    assert d == {"class": "d", "IoU": None, "ACC": None, "gt_pixels": 0, "pred_pixels": 0}


def test_per_class_defaults_to_indices_and_accepts_a_confusion_matrix():
    out = segmentation_metrics(ConfusionMatrix.from_matrix(HAND))
    assert [row["class"] for row in out["per_class"]] == [0, 1, 2, 3]
    assert out["mIoU"] == pytest.approx(100 * 164 / 429)


def _naive(pred: np.ndarray, gt: np.ndarray, k: int, ignore: int) -> np.ndarray:
    m = np.zeros((k + 1, k + 1), dtype=np.int64)
    for p, g in zip(pred.ravel().tolist(), gt.ravel().tolist()):
        m[p, k if g == ignore else g] += 1
    return m


def test_update_matches_a_naive_double_loop():
    rng = np.random.default_rng(0)
    k = 5
    for _ in range(5):
        pred = rng.integers(0, k, size=(7, 9))
        gt = rng.integers(0, k, size=(7, 9)).astype(np.uint8)
        gt[rng.random((7, 9)) < 0.2] = 255
        cm = ConfusionMatrix(k)
        cm.update(pred, gt)
        assert cm.matrix.dtype == np.int64 and cm.matrix.shape == (k + 1, k + 1)
        np.testing.assert_array_equal(cm.matrix, _naive(pred, gt, k, 255))
        assert cm.matrix[:, k].sum() == (gt == 255).sum() > 0


def test_update_at_full_size_with_uint16_labels():
    # ADE-847 style: uint16 labels, ignore 65535, a 640x640 image.
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 847, size=(640, 640)).astype(np.int32)
    gt = rng.integers(0, 847, size=(640, 640)).astype(np.uint16)
    gt[:10] = 65535
    cm = ConfusionMatrix(847, ignore_label=65535)
    cm.update(pred, gt)
    assert cm.matrix.sum() == 640 * 640
    assert cm.matrix[:, 847].sum() == 10 * 640
    assert cm.matrix[pred[320, 5], gt[320, 5]] >= 1


def test_merge_of_two_halves_equals_one_pass():
    rng = np.random.default_rng(2)
    pred = rng.integers(0, 6, size=(12, 10))
    gt = rng.integers(0, 6, size=(12, 10))
    gt[rng.random((12, 10)) < 0.1] = 255
    whole, top, bottom = ConfusionMatrix(6), ConfusionMatrix(6), ConfusionMatrix(6)
    whole.update(pred, gt)
    top.update(pred[:6], gt[:6])
    bottom.update(pred[6:], gt[6:])
    assert not np.array_equal(top.matrix, whole.matrix)
    top.merge(bottom)
    np.testing.assert_array_equal(top.matrix, whole.matrix)
    with pytest.raises(MetricsError, match="K=7"):
        top.merge(ConfusionMatrix(7))


# SG-IoU: K = 4, fathers {1: [0], 2: [0, 1], 0: [3]}; class 3 is in the GT but never predicted.
SG = np.array(
    [
        # gt: 0  1  2  3  ign
        [6, 2, 1, 1, 4],  # pred 0
        [2, 5, 3, 0, 0],  # pred 1
        [0, 1, 4, 0, 0],  # pred 2
        [0, 0, 0, 0, 0],  # pred 3 (never predicted)
        [0, 0, 0, 0, 0],
    ]
)
FATHERS = {1: [0], 2: [0, 1], 0: [3]}


def test_hand_computed_sg_iou():
    # pos_gt = [8, 8, 8, 1] (25); pos_pred = [10, 10, 5, 0] (the 4 ignored pixels are not in pos_pred0)
    # tp = [6, 5, 4, 0]; union = [8+10-6, 8+10-5, 8+5-4, 1] = [12, 13, 9, 1]
    # tp'0 = 6 + M[3,0]*1 = 6                       (father 3 never predicted: beta = 1, no division by zero)
    # tp'1 = 5 + 2*(2+6)/10 = 6.6                   (beta 0.8 < 1)
    # tp'2 = 4 + 1*(1+6)/10 + 3*(3+5)/10 = 7.1      (two fathers, betas 0.7 and 0.8)
    # IoU' = [6/12, 6.6/13, 7.1/9, 0]: the union keeps the plain tp (6.6/11.4 would be wrong)
    # SG-mIoU = (1/2 + 66/130 + 71/90 + 0)/4 = (585 + 594 + 923)/1170/4 = 1051/2340
    # SG-fwIoU = 8*(1051/585)/25 = 8408/14625; SG-mACC = (6/8 + 6.6/8 + 7.1/8 + 0)/4 = 0.615625
    # SG-pACC = (6 + 6.6 + 7.1)/25 = 0.788
    out = sg_iou_metrics(SG, FATHERS)
    assert out["SG-mIoU"] == pytest.approx(100 * 1051 / 2340)  # 44.914...
    assert out["SG-fwIoU"] == pytest.approx(100 * 8408 / 14625)  # 57.490...
    assert out["SG-mACC"] == pytest.approx(61.5625)
    assert out["SG-pACC"] == pytest.approx(78.8)
    ious = [row["IoU"] for row in out["per_class"]]
    assert ious == pytest.approx([50.0, 100 * 6.6 / 13, 100 * 7.1 / 9, 0.0])
    assert ious[1] != pytest.approx(100 * 6.6 / 11.4)
    # Without fathers SG-IoU is the plain metric.
    plain = segmentation_metrics(SG)
    assert sg_iou_metrics(SG, {})["SG-mIoU"] == pytest.approx(plain["mIoU"])
    assert plain["mIoU"] < out["SG-mIoU"]


def test_sg_iou_accepts_a_bare_int_father():
    assert sg_iou_metrics(SG, {1: 0})["SG-mIoU"] == pytest.approx(sg_iou_metrics(SG, {1: [0]})["SG-mIoU"])


def test_synonym_maps():
    ade847 = synonym_map("ade847")
    assert len(ade847) == 306
    assert ade847[316] == [714, 751] and ade847[63] == [16]
    assert all(isinstance(k, int) and all(isinstance(f, int) for f in v) for k, v in ade847.items())
    assert synonym_map("voc20") is None
    for name, k in (("ade150", 150), ("ade847", 847), ("pc459", 459)):
        fathers = synonym_map(name)
        assert fathers and all(0 <= c < k and all(0 <= f < k for f in fs) for c, fs in fathers.items())
    ade847[63].append(0)  # a caller's edit must not leak into the next call
    assert synonym_map("ade847")[63] == [16]


def test_the_847_map_does_not_fit_150_classes():
    matrix = np.eye(151, dtype=np.int64)
    with pytest.raises(MetricsError, match="does not fit K=150"):
        sg_iou_metrics(matrix, synonym_map("ade847"))
    with pytest.raises(MetricsError, match="own father"):
        sg_iou_metrics(SG, {1: [1]})


def test_bad_inputs_name_the_values():
    cm = ConfusionMatrix(5)
    with pytest.raises(MetricsError, match=r"\(2, 3\).*\(3, 2\)"):
        cm.update(np.zeros((2, 3), int), np.zeros((3, 2), int))
    with pytest.raises(MetricsError, match=r"ground-truth value 7 .*\[0, 5\).*ignore label 255"):
        cm.update(np.zeros((2, 2), int), np.array([[0, 7], [255, 9]]))
    with pytest.raises(MetricsError, match=r"prediction value 5 is outside \[0, 5\)"):
        cm.update(np.array([[0, 5]]), np.array([[0, 1]]))
    with pytest.raises(MetricsError, match=r"prediction value -1"):
        cm.update(np.array([[-1, 0]]), np.array([[0, 1]]))
    with pytest.raises(MetricsError, match="integer"):
        cm.update(np.zeros((2, 2)), np.zeros((2, 2), int))
    assert cm.matrix.sum() == 0  # a refused update adds nothing
    with pytest.raises(MetricsError, match="ignore label 3"):
        ConfusionMatrix(5, ignore_label=3)
    with pytest.raises(MetricsError, match="2 class names"):
        segmentation_metrics(HAND, class_names=["a", "b"])
    with pytest.raises(MetricsError, match=r"shape \(3, 4\)"):
        segmentation_metrics(np.zeros((3, 4), int))


def test_no_labelled_pixels_is_refused():
    cm = ConfusionMatrix(3)
    cm.update(np.array([[0, 1]]), np.array([[255, 255]]))
    for fn in (segmentation_metrics, lambda m: sg_iou_metrics(m, {})):
        with pytest.raises(MetricsError, match="no labelled pixels") as info:
            fn(cm.matrix)
        assert isinstance(info.value, ScanError) and isinstance(info.value, ValueError)


def test_ignore_label_none_counts_every_value():
    cm = ConfusionMatrix(3, ignore_label=None)
    cm.update(np.array([0, 1, 2]), np.array([0, 1, 2]))
    assert np.trace(cm.matrix) == 3 and cm.matrix[:, 3].sum() == 0
    with pytest.raises(MetricsError, match="ignore label None"):
        cm.update(np.array([0]), np.array([255]))

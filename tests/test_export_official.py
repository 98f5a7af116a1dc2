"""The exported pieces of the official fixture model against the official `sem_seg`.

Every piece passes its parity gate at three shapes; the pipeline assembled from ONNX
Runtime sessions (text encoder included) is compared with `expected.pt`. As for the eager
model (tests/test_fidelity.py), one mask pixel of this case lies within float rounding of
the mask threshold; the conditioned run resolves such pixels to the official side.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.fidelity import resolve_threshold_flips
from conftest import rel_diff
from export import ort_pipeline
from export.onnx_export import Shape, export_all
from runtime.images import load_image
from scan_model.loading import load_model

ARGMAX = 0.999  # issue 3: the exported pipeline equals the official argmax on >= 99.9% of pixels
RAW_ARGMAX = 0.995  # before resolving the near-threshold pixel (eager shows the same flip)
NEAR = 1e-5  # "within float rounding of the threshold", as for the eager model


@pytest.fixture(scope="module")
def case(official_dev, tmp_path_factory):
    model = load_model(official_dev.root / "model.pth", official_dev.root / "config.yaml", device="cpu").model
    records = export_all(model, tmp_path_factory.mktemp("official_onnx"), Shape(128, 160, 5, 6),
                         [Shape(96, 224, 3, 3), Shape(160, 96, 9, 11)])
    return model, records


def test_official_pieces_pass_parity_at_three_shapes(case):
    _, records = case
    for name, record in records.items():
        print(f"{name}: worst rel {record.worst_rel():.1e} over {len(record.parity)} shapes")
        assert len(record.parity) == 3 and record.worst_rel() <= 1e-3


def test_onnx_pipeline_reproduces_official_sem_seg(case, official_dev):
    model, records = case
    exp = official_dev.expected
    sessions = ort_pipeline.sessions({n: r.path for n, r in records.items()})
    classifier = ort_pipeline.onnx_classifier(model, sessions["text_encoder"], official_dev.classes)
    assert rel_diff(classifier, exp["text_features"]) <= 1e-4
    image = torch.from_numpy(load_image(official_dev.root / "image.png")).permute(2, 0, 1)[None].float()
    class_logits, probs, shift_tokens = ort_pipeline.encode_and_decode(model, sessions, image, classifier)
    assert rel_diff(class_logits, exp["pred_logits.calibrated"][0]) <= 1e-4

    sem_seg = ort_pipeline.classify_and_merge(model, sessions, image, classifier, class_logits, probs, shift_tokens)
    raw = float((sem_seg.argmax(0) == exp["sem_seg.argmax"]).double().mean())
    thr = model.cfg.inference.mask_threshold
    areas = (probs > thr).flatten(1).sum(1)
    ref_areas = exp["clip_adapter.mask_bin.area"]
    for q in (areas != ref_areas).nonzero().flatten().tolist():
        gap = float((probs[q] - thr).abs().min())
        print(f"query {q}: area {int(areas[q])} vs official {int(ref_areas[q])}, closest |p - thr| {gap:.1e}")
    resolved, explained = resolve_threshold_flips(probs, areas, ref_areas, thr, eps=NEAR)
    conditioned = ort_pipeline.classify_and_merge(model, sessions, image, classifier, class_logits, resolved, shift_tokens)
    agreement = float((conditioned.argmax(0) == exp["sem_seg.argmax"]).double().mean())
    flips = int((areas != exp["clip_adapter.mask_bin.area"]).sum())
    print(f"raw argmax {raw:.5f} ({flips} masks differ in area), conditioned {agreement:.5f}, "
          f"sem_seg rel {rel_diff(sem_seg, exp['sem_seg']):.1e} / conditioned {rel_diff(conditioned, exp['sem_seg']):.1e}")
    assert explained and flips <= 3
    assert rel_diff(sem_seg, exp["sem_seg"]) <= 1e-3
    assert raw >= RAW_ARGMAX
    assert agreement >= ARGMAX

"""ONNX export of the four pieces (tiny preset): structural checks, parity gates, assembled pipeline."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from export.onnx_export import DENIED_OPS, ExportError, Shape, check_graph, export_all
from export.pieces import PIECES
from scan_model.ensemble import ensemble_class_scores, semantic_map, upsample_masks
from scan_model.loading import load_model
from scan_model.synthetic import synthetic_scene

EXAMPLE = Shape(128, 160, 5, 6)
CHECKS = [Shape(96, 224, 3, 3), Shape(160, 96, 9, 11)]
TOLERANCE = 1e-3  # DESIGN.md: each piece within 1e-3 relative of eager


@pytest.fixture(scope="module")
def tiny_model():
    return load_model(None, "tiny", seed=0).model


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    return export_all(tiny_model, out, EXAMPLE, CHECKS, tolerance=TOLERANCE)


def test_every_piece_exports_with_parity_at_three_shapes(exported):
    assert set(exported) == set(PIECES)
    for name, record in exported.items():
        assert len(record.parity) == 3, name
        print(f"{name}: {record.op_count} ops, {record.path.stat().st_size / 1e6:.1f} MB, {record.seconds:.0f} s, "
              f"worst rel {record.worst_rel():.1e}")
        assert record.worst_rel() <= TOLERANCE
        assert not DENIED_OPS & set(record.op_types), name


def test_intended_axes_are_symbolic(exported):
    axes = {name: record.dynamic_axes for name, record in exported.items()}
    assert axes["image_encoder"]["image"][2:] == ["32*h32", "32*w32"]
    assert axes["mask_decoder"]["text_classifier"][0] == "classes_plus_one"
    assert isinstance(axes["clip_adapter"]["mask_probs"][0], str)
    assert all(isinstance(d, str) for d in axes["clip_adapter"]["image"][1:])
    assert axes["text_encoder"]["tokens"][0] == "prompts"


def test_deny_list_and_fixed_axes_are_caught():
    node = helper.make_node("DFT", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ExportError, match="DFT"):
        check_graph(proto, "demo", {"x": {0: None}}, ["x"])
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ExportError, match="meant to be dynamic"):
        check_graph(proto, "demo", {"x": {0: None}}, ["x"])


def _sessions(exported):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return {name: ort.InferenceSession(str(r.path), options, providers=["CPUExecutionProvider"]) for name, r in exported.items()}


@torch.no_grad()
def _onnx_pipeline(model, sessions, image: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """The whole pipeline from ONNX Runtime sessions; glue (normalise, upsample, ensemble) in torch."""
    swin, clip_padded = model.normalise_and_pad(image)
    clip_image = model.clip_input(clip_padded)
    enc = sessions["image_encoder"].run(None, {"image": swin.numpy(), "clip_image": clip_image.numpy()})
    mask_features, f0, f1, f2, context, global_cls, shift_tokens = enc
    class_logits, mask_logits = sessions["mask_decoder"].run(None, {
        "mask_features": mask_features, "features_0": f0, "features_1": f1, "features_2": f2,
        "clip_context": context, "global_cls": global_cls, "text_classifier": classifier.numpy(),
    })
    size = tuple(image.shape[-2:])
    probs = upsample_masks(torch.from_numpy(mask_logits), tuple(swin.shape[-2:]), size)[0].sigmoid()
    thr = model.cfg.inference.mask_threshold
    keep = (probs > thr).flatten(1).any(1)
    region_logits = torch.zeros(probs.shape[0], classifier.shape[0])
    if keep.any():
        logits, valid = sessions["clip_adapter"].run(None, {
            "image": image[0].numpy(), "mask_probs": probs[keep].numpy(), "mask_threshold": np.array(thr, np.float32),
            "shift_tokens": shift_tokens[0], "text_classifier": classifier.numpy(),
        })
        assert valid.all()
        region_logits[keep] = torch.from_numpy(logits)
    scores = ensemble_class_scores(torch.from_numpy(class_logits[0]), region_logits, keep, model.cfg.inference.ensemble_weight)
    return semantic_map(scores, probs)


@pytest.mark.parametrize("size", [(96, 128), (70, 101), (128, 96)])  # one non-square, one needing padding
def test_assembled_onnx_pipeline_matches_eager_labels(tiny_model, exported, size):
    sessions = _sessions(exported)
    image = torch.from_numpy(synthetic_scene(*size, seed=3).copy()).permute(2, 0, 1)[None].float()
    names = ["sky", "grass", "house", "sun", "ball"]
    tokens_check = exported["text_encoder"]
    assert tokens_check.path.is_file()
    classifier = tiny_model.text_classifier(tiny_model.encode_text(names))
    eager = tiny_model(image, classifier).sem_seg
    onnx_map = _onnx_pipeline(tiny_model, sessions, image, classifier)
    agreement = float((eager.argmax(0) == onnx_map.argmax(0)).double().mean())
    print(f"{size}: label agreement {agreement:.5f}, sem_seg max rel {float((eager - onnx_map).abs().max() / eager.abs().max()):.1e}")
    assert agreement >= 0.999


def test_tensorrt_rtx_gate_builds_every_piece(exported):
    """Every piece parses with TensorRT's ONNX importer and builds with dynamic profiles (AOT, no GPU)."""
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed (pip install 'scan-deploy[dev]')")
    from export.tensorrt import ShapeRanges, build_engine

    ranges = ShapeRanges(height=(64, 320, 640), width=(64, 320, 640), classes=(1, 10, 200), masks=(1, 16, 100))
    for name, record in exported.items():
        result = build_engine(record.path, name, ranges, backend="tensorrt_rtx")
        print(result.summary())
        assert result.built, result.summary()


def test_tensorrt_gate_reports_rejected_nodes(tmp_path):
    pytest.importorskip("tensorrt_rtx", reason="tensorrt-rtx not installed (pip install 'scan-deploy[dev]')")
    from export.tensorrt import ShapeRanges, build_engine

    node = helper.make_node("DFT", ["x"], ["y"], onesided=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 2])])
    path = tmp_path / "dft.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), path)
    result = build_engine(path, "text_encoder", ShapeRanges(), backend="tensorrt_rtx")
    assert not result.built and "DFT" in result.summary()


def test_exports_are_reproducible(tiny_model, tmp_path):
    from export.onnx_export import export_piece

    a = export_piece(tiny_model, "text_encoder", tmp_path / "a.onnx", EXAMPLE)
    b = export_piece(tiny_model, "text_encoder", tmp_path / "b.onnx", EXAMPLE)
    assert a.path.read_bytes() == b.path.read_bytes()

"""ONNX export of the four pieces (tiny preset, the session's bundle): structure, parity gates, fp16, engines."""

from __future__ import annotations

import onnx
import pytest
from onnx import TensorProto, helper

from conftest import rtx_available
from export.bundle import PIPELINE_AGREEMENT
from export.onnx_export import DENIED_OPS, FP16_TOLERANCE, ExportError, Shape, check_graph
from export.pieces import PIECES

EXAMPLE = Shape(128, 160, 5, 6)
TOLERANCE = 1e-3  # DESIGN.md: each piece within 1e-3 relative of eager


def _worst(piece) -> float:
    return max(v for p in piece.parity for v in p.max_rel.values())


def test_every_piece_exports_with_parity_at_three_shapes(tiny_bundle):
    pieces = tiny_bundle.manifest.pieces
    assert set(pieces) == set(PIECES)
    for name, piece in pieces.items():
        assert len(piece.parity) == 3, name
        print(f"{name}: {piece.op_count} ops, {piece.bytes / 1e6:.1f} MB, worst rel {_worst(piece):.1e}")
        assert _worst(piece) <= TOLERANCE
        proto = onnx.load(str(tiny_bundle.path / piece.file), load_external_data=False)
        assert not DENIED_OPS & {n.op_type for n in proto.graph.node}, name
    assert any(line.startswith("image_encoder: ") for line in tiny_bundle.log)  # per-piece progress lines


def test_intended_axes_are_symbolic(tiny_bundle):
    axes = {name: {t.name: t.shape for t in piece.inputs} for name, piece in tiny_bundle.manifest.pieces.items()}
    assert axes["image_encoder"]["image"][2:] == ["32*h32", "32*w32"]
    assert axes["mask_decoder"]["text_classifier"][0] == "classes_plus_one"
    assert isinstance(axes["clip_adapter"]["mask_probs"][0], str)
    assert axes["clip_adapter"]["shift_keys"][1] == axes["clip_adapter"]["mask_probs"][0]
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


def test_fp16_pieces_keep_fp32_islands_and_pass_their_gate(tiny_bundle):
    from export.fp16 import half_fraction

    for name, record in tiny_bundle.manifest.pieces.items():
        half = onnx.load(str(tiny_bundle.path / record.fp16.file))
        assert _worst(record.fp16) <= FP16_TOLERANCE, name
        print(f"{name}: fp16 worst rel {_worst(record.fp16):.1e}, {half_fraction(half):.0%} of weight bytes in fp16")
        assert half_fraction(half) > 0.7, name  # most weights are stored in fp16 ...
        types = _value_types(half)
        for node in half.graph.node:  # ... while LayerNorm, softmax and GridSample compute in fp32
            if node.op_type in ("LayerNormalization", "Softmax", "GridSample"):
                assert types[node.input[0]] == TensorProto.FLOAT, (name, node.name)
        full = onnx.load(str(tiny_bundle.path / record.file), load_external_data=False)
        io_types = lambda g: [v.type.tensor_type.elem_type for v in [*g.input, *g.output]]  # noqa: E731
        assert io_types(half.graph) == io_types(full.graph)


def test_fp16_keeps_lfm_and_crop_arithmetic_in_fp32(tiny_bundle):
    from export.fp16 import fp16_nodes

    encoder = onnx.load(str(tiny_bundle.path / "image_encoder.onnx"))
    lfm = [i for i, n in enumerate(encoder.graph.node) if any("calibration.lfm" in p.value for p in n.metadata_props)]
    assert lfm and not set(lfm) & fp16_nodes(encoder, "image_encoder")
    adapter = onnx.load(str(tiny_bundle.path / "clip_adapter.onnx"))
    outside_clip = [i for i, n in enumerate(adapter.graph.node)
                    if not any("model.clip.visual" in p.value for p in n.metadata_props)]
    assert outside_clip and not set(outside_clip) & fp16_nodes(adapter, "clip_adapter")


def _value_types(proto):
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]}
    types.update({i.name: i.data_type for i in proto.graph.initializer})
    return types


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_pipeline_check_of_the_export(tiny_bundle, precision):
    """The end-to-end gate the bundle ran: runtime.Segmenter against eager, >= 99.9% (fp32) / >= 99% (fp16) / int8's bound."""
    checks = tiny_bundle.manifest.pipeline_check[precision]
    assert len(checks) == 3
    for check in checks:
        print(precision, check)
        assert check.label_agreement >= PIPELINE_AGREEMENT[precision] == check.required
    assert f"pipeline ({precision}): runtime labels identical" in "\n".join(tiny_bundle.log)


@pytest.mark.skipif(not rtx_available(), reason="tensorrt-rtx not installed (pip install 'scan-deploy[dev]')")
def test_tensorrt_rtx_engines_for_every_piece(tiny_bundle):
    """Every fp16 piece parsed and built with dynamic profiles (AOT, no GPU) during the export."""
    (folder, engines), = tiny_bundle.manifest.engines.items()
    assert folder.startswith("aot-trtrtx") and folder.endswith("-fp16")
    assert set(engines.pieces) == set(PIECES)
    for name, plan in engines.pieces.items():
        assert (tiny_bundle.path / plan.file).stat().st_size == plan.bytes > 0, name
        assert plan.onnx == f"{name}.fp16.onnx"


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


def test_pipeline_gate_excuses_only_flips_within_rounding_of_the_threshold(tiny_model, tiny_bundle, tmp_path):
    """A mask pixel far from the threshold on the other side is a real difference: never excused."""
    import numpy as np
    import torch

    from export.bundle import _compare
    from runtime.segmenter import Segmenter
    from runtime.synthetic import synthetic_scene

    names = ["sky", "grass", "house", "sun", "ball"]
    segmenter = Segmenter(tiny_bundle.path, backend="onnxruntime", resize=False, cache_dir=tmp_path)
    segmenter.set_vocabulary(names)
    image = synthetic_scene(96, 128, seed=3)
    with torch.no_grad():
        eager = tiny_model(torch.from_numpy(image.copy()).permute(2, 0, 1)[None].float(),
                           tiny_model.text_classifier(tiny_model.encode_text(names)))
    expected, probs = eager.sem_seg.argmax(0).numpy(), eager.mask_probs.numpy()
    sound = _compare(segmenter, image, expected, probs, 0.999)
    assert sound.passed and sound.conditioned_agreement is None
    wrong = np.where(expected == 0, 1, 0)  # another labelling, and eager masks far across the threshold
    far = np.clip(probs + 0.3, 0, 1)
    broken = _compare(segmenter, image, wrong, far, 0.999)
    assert not broken.passed and broken.conditioned_agreement is None and broken.threshold_flips == 0

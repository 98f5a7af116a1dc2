"""int8 pieces for ONNX Runtime on CPU: export, manifest records, the runtime's choice, bad requests."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from cli import app
from export.bundle import PIPELINE_AGREEMENT, check_precision, engine_precision
from export.int8 import INT8_PIECES, quantize_piece
from export.onnx_export import INT8_TOLERANCE
from runtime.errors import BundleError, ScanError
from runtime.files import sha256_file
from runtime.manifest import MANIFEST, read_manifest
from runtime.segmenter import Segmenter
from runtime.synthetic import synthetic_scene

NAMES = ["sky", "grass", "house", "sun", "ball"]
QUANTISED_OPS = {"MatMulInteger", "DynamicQuantizeLinear"}


def test_int8_pieces_are_written_and_recorded(tiny_bundle):
    manifest = tiny_bundle.manifest
    assert set(INT8_PIECES) == {name for name, piece in manifest.pieces.items() if piece.int8 is not None}
    recorded = {f.file for f in manifest.files()}
    for name in INT8_PIECES:
        int8 = manifest.pieces[name].int8
        path = tiny_bundle.path / int8.file
        assert int8.file == f"{name}.int8.onnx" and int8.file in recorded
        assert int8.precision == "int8" and int8.sha256 == sha256_file(path) and int8.bytes == path.stat().st_size
        assert int8.parity_tolerance == INT8_TOLERANCE and len(int8.parity) == 3
        worst = max(v for p in int8.parity for v in p.max_rel.values())
        print(f"{name}: int8 worst rel {worst:.1e}, {int8.bytes / 1e6:.1f} MB (fp32 {manifest.pieces[name].bytes / 1e6:.1f} MB)")
        assert 0 < worst <= INT8_TOLERANCE  # quantised (not bit-equal to fp32), and within the gate
        assert int8.bytes < 0.75 * manifest.pieces[name].bytes  # int8 weights (tiny: 62% and 43%)
        assert [t.name for t in int8.inputs] == [t.name for t in manifest.pieces[name].inputs]
        if name == "clip_adapter":  # the valid flags come from fp32 arithmetic: exact
            assert all(p.max_rel["valid"] == 0 for p in int8.parity)
    assert "int8 worst" in "\n".join(line for line in tiny_bundle.log if line.startswith("clip_adapter: "))


def test_int8_files_are_really_quantised(tiny_bundle):
    for name in INT8_PIECES:
        proto = onnx.load(str(tiny_bundle.path / tiny_bundle.manifest.pieces[name].int8.file))
        ops = {node.op_type for node in proto.graph.node}
        assert QUANTISED_OPS <= ops, name
        weights = {init.name for init in proto.graph.initializer}
        left = [n.name for n in proto.graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights]
        assert not left, (name, left[:5])  # every matrix product with a weight runs in int8
        assert any(init.data_type == onnx.TensorProto.INT8 for init in proto.graph.initializer)


def test_int8_runtime_agrees_with_eager_and_fp32(tiny_bundle, tiny_model, tmp_path):
    from scan_model.segmenter import EagerSegmenter

    runtimes = {p: Segmenter(tiny_bundle.path, backend="onnxruntime", precision=p, resize=False, cache_dir=tmp_path) for p in ("fp32", "int8")}
    eager = EagerSegmenter(tiny_model, resize=False)
    for segmenter in (*runtimes.values(), eager):
        segmenter.set_vocabulary(NAMES)
    image = synthetic_scene(160, 224, seed=7)  # not one of the export gate's scenes
    results = {p: s.segment(image, return_scores=True) for p, s in runtimes.items()}
    ref = eager.segment(image)
    for other, labels in (("eager", ref.label_map), ("fp32 runtime", results["fp32"].label_map)):
        agreement = float((results["int8"].label_map == labels).mean())
        print(f"int8 vs {other}: {agreement:.4%} identical labels")
        assert agreement >= PIPELINE_AGREEMENT["int8"], other
    # The int8 files ran: scores move by more than fp32 rounding.
    assert np.abs(results["int8"].sem_seg - results["fp32"].sem_seg).max() > 1e-4
    files = {n: p.variant("int8").file for n, p in runtimes["int8"].manifest.pieces.items()}
    assert files == {n: f"{n}.int8.onnx" if n in INT8_PIECES else f"{n}.onnx" for n in files}


def test_quantize_piece_is_deterministic_and_handles_external_data(tiny_bundle, tmp_path):
    import onnxruntime as ort

    source = tiny_bundle.path / "clip_adapter.onnx"
    a, b = quantize_piece(source, tmp_path / "a.onnx"), quantize_piece(source, tmp_path / "b.onnx")
    assert (a, b) == ([tmp_path / "a.onnx"], [tmp_path / "b.onnx"])
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]  # no temporary files left
    # A source whose weights live in external data (pieces over 1.8 GB) gives an int8 file that does too.
    big = tmp_path / "big" / "clip_adapter.onnx"
    big.parent.mkdir()
    onnx.save(onnx.load(str(source)), str(big), save_as_external_data=True, location="clip_adapter.onnx.data",
              size_threshold=0)
    written = quantize_piece(big, big.with_name("clip_adapter.int8.onnx"))
    assert [p.name for p in written] == ["clip_adapter.int8.onnx", "clip_adapter.int8.onnx.data"]
    proto = onnx.load(str(written[0]), load_external_data=False)
    inline = [i.name for i in proto.graph.initializer if i.data_location != onnx.TensorProto.EXTERNAL and len(i.raw_data) > 1024]
    assert not inline and any(i.data_type == onnx.TensorProto.INT8 and i.data_location == onnx.TensorProto.EXTERNAL
                              for i in proto.graph.initializer)
    feeds = _adapter_feeds(tiny_bundle.manifest)
    inline = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"]).run(None, feeds)
    external = ort.InferenceSession(str(written[0]), providers=["CPUExecutionProvider"]).run(None, feeds)
    assert all(np.array_equal(x, y) for x, y in zip(inline, external))


def _adapter_feeds(manifest) -> dict:
    from runtime.settings import shift_counts, shift_key

    rng = np.random.default_rng(0)
    inf, height, width, masks = manifest.inference, 64, 96, 3
    rows, cols = np.mgrid[0:height, 0:width]
    probs = np.stack([np.exp(-((rows - 20 * i - 10) ** 2 + (cols - 30 * i - 10) ** 2) / 200.0) for i in range(masks)])
    spec = {t.name: t.shape for t in manifest.pieces["clip_adapter"].inputs}
    classifier = rng.standard_normal((6, spec["text_classifier"][1])).astype(np.float32)
    return {
        "image": rng.uniform(0, 255, (3, height, width)).astype(np.float32),
        "mask_probs": probs.astype(np.float32),
        "mask_threshold": np.asarray(0.4, dtype=np.float32),
        "shift_tokens": rng.standard_normal(spec["shift_tokens"]).astype(np.float32),
        "text_classifier": classifier / np.linalg.norm(classifier, axis=1, keepdims=True),
        "shift_counts": np.asarray(shift_counts(inf.shift_patches, 0.5), dtype=np.int64),
        "shift_keys": np.ascontiguousarray(np.broadcast_to(shift_key(inf.shift_patches), (len(inf.replace_layers), masks,
                                                                                          inf.shift_patches))),
    }


def test_precision_values():
    assert check_precision("fp32") == () and check_precision("fp16") == ("fp16",) and check_precision("int8") == ("int8",)
    assert check_precision("int8,fp16") == check_precision("fp16, int8") == ("fp16", "int8")
    assert engine_precision("int8") == "fp32" and engine_precision("fp16,int8") == "fp16"
    for bad in ("int4", "fp16,", "", "FP16"):
        with pytest.raises(BundleError, match="choose fp32, fp16, int8"):
            check_precision(bad)


def test_bad_precision_on_the_command_line(tmp_path):
    result = CliRunner().invoke(app, ["export", "--preset", "tiny", "--out", str(tmp_path / "b"), "--precision", "int4"])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "choose fp32, fp16, int8" in lines[0], result.output
    assert not (tmp_path / "b").exists()


def test_runtime_refuses_int8_where_it_cannot_run(tiny_bundle, tmp_path):
    with pytest.raises(ScanError, match="int8 is for the CPU"):
        Segmenter(tiny_bundle.path, backend="tensorrt", precision="int8")
    with pytest.raises(ScanError, match="choose one of fp32, fp16, bf16, int8"):
        Segmenter(tiny_bundle.path, backend="onnxruntime", precision="int4")
    # A bundle exported without int8 (an older schema-2 manifest has no int8 fields at all).
    copy = tmp_path / "no_int8"
    copy.mkdir()
    for entry in tiny_bundle.path.iterdir():
        if entry.name != MANIFEST:
            os.symlink(entry, copy / entry.name)
    manifest = json.loads((tiny_bundle.path / MANIFEST).read_text())
    for piece in manifest["pieces"].values():
        del piece["int8"]
    (copy / MANIFEST).write_text(json.dumps(manifest))
    assert all(p.int8 is None for p in read_manifest(copy).pieces.values())
    with pytest.raises(BundleError, match=r"scan export --precision int8") as info:
        Segmenter(copy, backend="onnxruntime", precision="int8")
    assert "\n" not in str(info.value)
    Segmenter(copy, backend="onnxruntime", precision="fp16", cache_dir=tmp_path)  # the other variants still run


def test_doctor_lists_the_variants(tiny_bundle):
    result = CliRunner().invoke(app, ["doctor", "--bundle", str(tiny_bundle.path)])
    assert result.exit_code == 0, result.output
    lines = {line.split()[0]: line for line in result.output.splitlines() if line.startswith("  ") and line.split()}
    for name, piece in tiny_bundle.manifest.pieces.items():
        assert ("+ int8" in lines[name]) == (name in INT8_PIECES) and "+ fp16" in lines[name], lines[name]
    assert "pipeline (int8) runtime labels identical to eager" in result.output

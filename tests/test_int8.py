"""Calibrated int8 pieces (NNCF, QDQ): export, scope, manifest records, the runtime's choice, bad requests."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from typer.testing import CliRunner

from cli import app
from export.bundle import PIPELINE_AGREEMENT, check_precision, engine_precision
from export.int8 import DYNAMIC_METHOD, DYNAMIC_PIECES, INT8_PIECES, QUANTISED_SCOPES, node_scopes, quantize_piece
from export.onnx_export import INT8_TOLERANCE
from export.precision_checks import MIN_COSINE, output_errors
from runtime.errors import BundleError, ScanError
from runtime.files import sha256_file
from runtime.manifest import MANIFEST, read_manifest
from runtime.segmenter import Segmenter
from runtime.synthetic import synthetic_scene

NAMES = ["sky", "grass", "house", "sun", "ball"]
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


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
        assert int8.bytes < 0.75 * manifest.pieces[name].bytes  # int8 weights (tiny: 61% and 50%)
        assert [t.name for t in int8.inputs] == [t.name for t in manifest.pieces[name].inputs]
        assert int8.quantisation["scope"] == list(QUANTISED_SCOPES[name]) and int8.quantisation["calls"] >= 3
        assert "drawn scenes" in int8.quantisation["calibration"]
        # Each engine's check is on the file that engine runs (ONNX Runtime: the dynamic one where there is one).
        for engine in ("onnxruntime", "openvino"):
            runs = manifest.pieces[name].variant("int8", engine)
            assert [c.engine for c in runs.precision_checks if c.engine == engine] == [engine], (name, engine)
        checks = [*int8.precision_checks, *getattr(manifest.pieces[name].int8_dynamic, "precision_checks", [])]
        assert all(c.passed and c.precision == "int8" for c in checks)
        for check in checks:
            assert set(check.min_cosine) == {t.name for t in int8.outputs}
            assert min(check.min_cosine.values()) >= MIN_COSINE["int8"] and check.calls >= 3
        if name == "clip_adapter":  # the valid flags come from fp32 arithmetic: exact
            assert all(p.max_rel["valid"] == 0 for p in int8.parity)
            assert all(c.min_cosine["valid"] == 1.0 for c in int8.precision_checks)
    assert any(line.startswith("calibration: 3 drawn scenes") for line in tiny_bundle.log)


def test_onnxruntime_gets_a_dynamic_int8_file_for_the_pieces_it_runs_faster_that_way(tiny_bundle, tmp_path):
    manifest = tiny_bundle.manifest
    assert DYNAMIC_PIECES == ("image_encoder",)
    assert {n for n, p in manifest.pieces.items() if p.int8_dynamic is not None} == set(DYNAMIC_PIECES)
    recorded = {f.file for f in manifest.files()}
    for name in DYNAMIC_PIECES:
        dynamic, qdq = manifest.pieces[name].int8_dynamic, manifest.pieces[name].int8
        path = tiny_bundle.path / dynamic.file
        assert dynamic.file == f"{name}.int8-dynamic.onnx" and dynamic.file in recorded
        assert dynamic.sha256 == sha256_file(path) and dynamic.precision == "int8"
        assert dynamic.quantisation["method"] == DYNAMIC_METHOD and len(dynamic.parity) == 3
        assert 0 < max(v for p in dynamic.parity for v in p.max_rel.values()) <= INT8_TOLERANCE
        ops = {node.op_type for node in onnx.load(str(path)).graph.node}
        assert {"DynamicQuantizeLinear", "MatMulInteger"} <= ops and "QuantizeLinear" not in ops  # no static ranges
        assert [c.engine for c in dynamic.precision_checks] == ["onnxruntime"]
        assert manifest.pieces[name].variant("int8", "onnxruntime") is dynamic
        assert manifest.pieces[name].variant("int8", "openvino") is qdq and manifest.pieces[name].variant("int8") is qdq
    runtime = Segmenter(tiny_bundle.path, backend="onnxruntime", precision="int8", resize=False, cache_dir=tmp_path)
    assert Path(runtime.runners["image_encoder"].path).name == "image_encoder.int8-dynamic.onnx"


def test_int8_files_quantise_the_chosen_scope_only(tiny_bundle):
    for name in INT8_PIECES:
        proto = onnx.load(str(tiny_bundle.path / tiny_bundle.manifest.pieces[name].int8.file))
        assert QDQ_OPS <= {node.op_type for node in proto.graph.node}, name
        dequantised = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
        inside = outside = 0
        for node in proto.graph.node:
            if node.op_type not in ("MatMul", "Gemm", "Conv") or node.input[1] not in dequantised:
                continue
            in_scope = any(p.startswith(QUANTISED_SCOPES[name]) for p in node_scopes(node))
            inside, outside = inside + in_scope, outside + (not in_scope)
        print(f"{name}: {inside} quantised products in scope, {outside} outside")
        assert inside >= 10 and outside == 0, name  # the towers run int8; the crop, threshold and shift path does not
        assert any(init.data_type == onnx.TensorProto.INT8 for init in proto.graph.initializer)


def test_output_errors_measure_cosine_and_relative_error():
    ref = [{"x": np.array([1.0, 2.0, 3.0], dtype=np.float32), "ok": np.array([True, False])}]
    same, scaled = output_errors(ref, ref), output_errors(ref, [{"x": ref[0]["x"] * 2, "ok": np.array([True, True])}])
    assert same == ({"x": 1.0, "ok": 1.0}, {"x": 0.0, "ok": 0.0})
    assert abs(scaled[0]["x"] - 1.0) < 1e-12 and abs(scaled[1]["x"] - 1.0) < 1e-12  # cosine blind to scale; rel is not
    assert scaled[0]["ok"] == 0.5 and scaled[1]["ok"] == 1.0
    broken = output_errors(ref, [{"x": np.array([1.0, np.nan, 3.0]), "ok": ref[0]["ok"]}])
    assert broken[0]["x"] == -1.0 and broken[1]["x"] == float("inf")


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
    files = {n: p.variant("int8", "onnxruntime").file for n, p in runtimes["int8"].manifest.pieces.items()}
    assert files == {n: f"{n}.int8-dynamic.onnx" if n in DYNAMIC_PIECES else f"{n}.int8.onnx" if n in INT8_PIECES
                     else f"{n}.onnx" for n in files}


def test_quantize_piece_is_deterministic_and_handles_external_data(tiny_bundle, tmp_path):
    import onnxruntime as ort

    source = tiny_bundle.path / "clip_adapter.onnx"
    calls = [_adapter_feeds(tiny_bundle.manifest, seed) for seed in range(3)]
    a = quantize_piece("clip_adapter", source, tmp_path / "a.onnx", calls)
    b = quantize_piece("clip_adapter", source, tmp_path / "b.onnx", calls)
    assert (a, b) == ([tmp_path / "a.onnx"], [tmp_path / "b.onnx"])
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]  # no temporary files left
    # Pieces over 1.8 GB keep their weights in external data, and so does their int8 file.
    (tmp_path / "big").mkdir()
    written = quantize_piece("clip_adapter", source, tmp_path / "big" / "clip_adapter.int8.onnx", calls, external_data=True)
    assert [p.name for p in written] == ["clip_adapter.int8.onnx", "clip_adapter.int8.onnx.data"]
    proto = onnx.load(str(written[0]), load_external_data=False)
    assert any(i.data_type == onnx.TensorProto.INT8 and i.data_location == onnx.TensorProto.EXTERNAL
               for i in proto.graph.initializer)
    inline = ort.InferenceSession(str(tmp_path / "a.onnx"), providers=["CPUExecutionProvider"]).run(None, calls[0])
    external = ort.InferenceSession(str(written[0]), providers=["CPUExecutionProvider"]).run(None, calls[0])
    assert all(np.array_equal(x, y) for x, y in zip(inline, external))


def test_quantize_piece_refuses_pieces_without_a_scope_and_empty_calibration(tiny_bundle, tmp_path):
    with pytest.raises(ValueError, match="mask_decoder has no int8 scope"):
        quantize_piece("mask_decoder", tiny_bundle.path / "mask_decoder.onnx", tmp_path / "m.onnx", [{}])
    with pytest.raises(ValueError, match="no calibration inputs"):
        quantize_piece("clip_adapter", tiny_bundle.path / "clip_adapter.onnx", tmp_path / "c.onnx", [])
    assert not any(tmp_path.iterdir())


def _adapter_feeds(manifest, seed: int = 0) -> dict:
    from runtime.settings import shift_counts, shift_key

    rng = np.random.default_rng(seed)
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


def _edited_copy(bundle, copy, edit):
    """`bundle`'s files linked into `copy`, with its manifest passed through `edit` (a dict in place)."""
    copy.mkdir()
    for entry in bundle.iterdir():
        if entry.name != MANIFEST:
            os.symlink(entry, copy / entry.name)
    manifest = json.loads((bundle / MANIFEST).read_text())
    edit(manifest)
    (copy / MANIFEST).write_text(json.dumps(manifest))
    return copy


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
    def drop_int8(manifest):
        for piece in manifest["pieces"].values():
            del piece["int8"]

    copy = _edited_copy(tiny_bundle.path, tmp_path / "no_int8", drop_int8)
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


def test_calibration_options_are_checked_before_the_export(tmp_path):
    runner = CliRunner()
    for args, message in ((["--calibration", str(tmp_path)], "--calibration is for int8 pieces"),
                          (["--precision", "int8", "--calibration", str(tmp_path / "missing")], "not a folder of images nor a dataset")):
        result = runner.invoke(app, ["export", "--preset", "tiny", "--out", str(tmp_path / "b"), *args])
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
        assert not (tmp_path / "b").exists()


def test_calibration_set_reads_image_folders_and_datasets(tmp_path):
    from export.calibration import calibration_set
    from export.onnx_export import Shape
    from runtime.synthetic_data import write_synthetic_dataset

    write_synthetic_dataset(tmp_path / "data", images=12, size=(64, 96), seed=1)
    dataset = calibration_set(tmp_path / "data", [], limit=4)
    assert len(dataset.images) == 4 and dataset.resize and "train images of data" in dataset.source
    assert dataset.names == json.loads((tmp_path / "data" / "synthetic.json").read_text())["classes"]
    folder = calibration_set(tmp_path / "data" / "images" / "val", [], limit=8)
    assert len(folder.images) == 3 and folder.images[0].shape == (64, 96, 3) and len(folder.names) == 150
    drawn = calibration_set(None, [Shape(64, 96, 3, 2), Shape(96, 64, 3, 2)])
    assert [i.shape for i in drawn.images] == [(64, 96, 3), (96, 64, 3)] and not drawn.resize and len(drawn.names) == 10


def test_openvino_runs_the_int8_files_and_agrees_with_onnxruntime_int8(tiny_bundle, tmp_path):
    pytest.importorskip("openvino", reason="pip install openvino")
    from runtime.cpu import cpu_info

    quiet = lambda line: None  # noqa: E731
    ours = Segmenter(tiny_bundle.path, backend="openvino", precision="int8", resize=False, cache_dir=tmp_path, threads=2,
                     report=quiet)
    ref = Segmenter(tiny_bundle.path, backend="onnxruntime", precision="int8", resize=False, cache_dir=tmp_path, threads=2)
    hint = "bf16" if cpu_info().native_bf16 else "f32"
    assert {n: r.precision for n, r in ours.runners.items() if n in INT8_PIECES} == {n: "int8" for n in INT8_PIECES}
    assert all(r.settings.precision == hint for n, r in ours.runners.items() if n in INT8_PIECES)
    for segmenter in (ours, ref):
        segmenter.set_vocabulary(NAMES)
    image = synthetic_scene(160, 224, seed=7)
    agreement = float((ours.segment(image).label_map == ref.segment(image).label_map).mean())
    print(f"openvino int8 ({hint} elsewhere) vs onnxruntime int8: {agreement:.4%}")
    # Random weights: near-ties between classes (see tests/test_openvino.py); a broken run gives ~1/K.
    assert agreement >= 0.5


def test_a_piece_that_failed_the_bf16_check_runs_f32_and_says_so(tiny_bundle, tmp_path):
    pytest.importorskip("openvino", reason="pip install openvino")
    from dataclasses import replace

    from runtime.cpu import cpu_info

    def fail_bf16(manifest):
        manifest["pieces"]["mask_decoder"]["precision_checks"] = [{
            "engine": "openvino", "precision": "bf16", "compiled": "bf16-t2", "inputs": "a test", "calls": 3,
            "min_cosine": {"class_logits": 0.9, "mask_logits": 0.999},
            "max_rel": {"class_logits": 0.5, "mask_logits": 0.01}, "required_cosine": 0.99, "passed": False}]

    copy = _edited_copy(tiny_bundle.path, tmp_path / "bundle", fail_bf16)
    lines: list[str] = []
    native = replace(cpu_info(), native_bf16=True)
    segmenter = Segmenter(copy, backend="openvino", precision="bf16", resize=False, cache_dir=tmp_path / "c",
                          cpu=native, report=lines.append)
    assert segmenter.runners["mask_decoder"].settings.precision == "f32"
    assert all(r.settings.precision == "bf16" for n, r in segmenter.runners.items() if n != "mask_decoder")
    note = "mask_decoder: runs f32, not bf16: at export its class_logits kept a cosine of 0.9000"
    assert any(note in n for n in segmenter.notes) and any(note in line for line in lines)

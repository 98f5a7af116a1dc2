"""`scan export --tensorrt`, engine folders, profiles, external data and the doctor's gate report.

TensorRT-RTX builds engines ahead of time without a GPU, so the engine path runs here; the
standard `tensorrt` module cannot be installed on these machines, and its GPU-only paths
say so.
"""

from __future__ import annotations

import json

import onnx
import pytest
from typer.testing import CliRunner

from cli import app
from export.bundle import MANIFEST, sha256_file, write_bundle
from export.onnx_export import Shape, export_piece, ort_parity, parity_gate
from export.tensorrt import ShapeRanges, load_tensorrt
from scan_model.loading import load_model

SMALL = dict(example=Shape(64, 96, 3, 2), checks=(Shape(96, 64, 5, 3),), pieces=("text_encoder",))
RANGES = ShapeRanges(height=(64, 320, 640), width=(64, 320, 640), classes=(1, 10, 200), masks=(1, 16, 100),
                     prompts=(1, 16, 256))
def _rtx_available() -> bool:
    try:
        load_tensorrt(("tensorrt_rtx",))
        return True
    except Exception:
        return False


needs_rtx = pytest.mark.skipif(not _rtx_available(), reason="tensorrt-rtx not installed (pip install 'scan-deploy[dev]')")


@pytest.fixture(scope="module")
def model():
    return load_model(None, "tiny", seed=0).model


@needs_rtx
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_bundle_with_engines(model, tmp_path, precision):
    import tensorrt_rtx

    out = tmp_path / "bundle"
    manifest = write_bundle(model, out, None, {}, precision=precision, tensorrt=True, ranges=RANGES,
                            trt_backend="tensorrt_rtx", report=lambda line: None, **SMALL)
    folder = f"aot-trtrtx{tensorrt_rtx.__version__}-{precision}"
    assert list(manifest.engines) == [folder]
    entry = manifest.engines[folder]
    assert entry.backend == "tensorrt_rtx" and entry.precision == precision
    plan = entry.pieces["text_encoder"]
    assert plan.file == f"engines/{folder}/text_encoder.plan"
    assert plan.sha256 == sha256_file(out / plan.file) and plan.bytes == (out / plan.file).stat().st_size
    assert plan.profile == {"tokens": {"min": [1, 2], "opt": [16, 16], "max": [256, 77]}}  # prompts x sequence
    assert plan.onnx == ("text_encoder.fp16.onnx" if precision == "fp16" else "text_encoder.onnx")
    if precision == "fp16":
        assert manifest.pieces["text_encoder"].fp16.precision == "fp16"
        assert (out / "text_encoder.fp16.onnx").is_file()
    assert json.loads((out / MANIFEST).read_text())["engines"] == manifest.to_dict()["engines"]


@needs_rtx
def test_doctor_reports_the_gate_on_a_bundle(model, tmp_path):
    out = tmp_path / "bundle"
    write_bundle(model, out, None, {}, **SMALL)
    result = CliRunner().invoke(app, ["doctor", "--bundle", str(out), "--build"])
    assert result.exit_code == 0, result.output
    assert "tensorrt_rtx" in result.output and "[fp32] text_encoder: built with tensorrt_rtx" in result.output
    result = CliRunner().invoke(app, ["doctor", "--bundle", str(tmp_path)])
    assert result.exit_code == 2 and "not a bundle" in result.stderr


def test_shape_ranges_are_validated():
    with pytest.raises(ValueError, match="multiples of 32"):
        ShapeRanges(height=(300, 640, 1024))
    with pytest.raises(ValueError, match="min <= opt <= max"):
        ShapeRanges(masks=(10, 5, 100))


def test_cli_refuses_bad_engine_options_before_exporting(tmp_path):
    runner = CliRunner()
    for args, needle in (
        (["--trt-height", "300,640,1024"], "multiples of 32"),
        (["--trt-masks", "1,100"], "three integers"),
        (["--precision", "int4"], "choose fp32, fp16, int8"),
        (["--tensorrt", "--trt-backend", "tensorrt"], "tensorrt"),
    ):
        result = runner.invoke(app, ["export", "--preset", "tiny", "--out", str(tmp_path / "b"), *args])
        assert result.exit_code == 2 and needle in result.stderr, (args, result.output)
        assert not (tmp_path / "b").exists()


def test_without_tensorrt_module_the_message_says_what_to_install():
    from export.tensorrt import TensorRTUnavailable

    with pytest.raises(TensorRTUnavailable, match="install"):
        load_tensorrt(("tensorrt_that_does_not_exist",))


def test_large_pieces_go_to_external_data(model, tmp_path):
    """Pieces over the 2 GB protobuf limit use external data; forced here with a zero threshold."""
    record = export_piece(model, "text_encoder", tmp_path / "text_encoder.onnx", Shape(64, 96, 3, 4), external_data_bytes=0)
    assert record.external_data and [p.name for p in record.files()] == ["text_encoder.onnx", "text_encoder.onnx.data"]
    assert record.path.stat().st_size * 10 < record.files()[1].stat().st_size
    proto = onnx.load(str(record.path), load_external_data=False)
    assert any(init.data_location == onnx.TensorProto.EXTERNAL for init in proto.graph.initializer)
    ort_parity(model, record, [Shape(64, 96, 3, 4), Shape(96, 64, 5, 7)])
    parity_gate(record, 1e-3)
    manifest = write_bundle(model, tmp_path / "bundle", None, {}, external_data_bytes=0, **SMALL)
    entry = manifest.pieces["text_encoder"].external_data
    assert entry.sha256 == sha256_file(tmp_path / "bundle" / entry.file)

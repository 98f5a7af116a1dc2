"""`scan bench`: a tiny run through the CLI against the session bundle, its JSON schema, the
statistics and memory helpers, the export cache, and one-line errors. Speed is never asserted."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from benchmarks.backends import parse_backends
from benchmarks.memory import RssSampler, proc_available
from benchmarks.stats import summarise
from cli import app
from runtime.errors import ScanError

runner = CliRunner()
STAGES = {"preprocess", "image_encoder", "mask_decoder", "clip_adapter", "ensemble", "postprocess"}
VOCAB = "sky,grass,house,tree,road"

# -- the schema of benchmarks/SCHEMA.md, as required keys and their types ---------------------
NUM, OPT_NUM, OPT_INT, OPT_STR = (int, float), (int, float, type(None)), (int, type(None)), (str, type(None))
PERCENTILES = {"p50": NUM, "p90": NUM, "p99": NUM, "mean": NUM}
TOP = {
    "schema_version": int, "method": str, "runs": int, "warmup": int, "seed": int, "notes": list, "ratios": dict,
    "sweeps": dict, "compute": (dict, type(None)),
    "machine": {"cpu": str, "logical_cores": int, "memory_bytes": OPT_INT, "os": str, "python": str},
    "threads": {"torch_intra_op": OPT_INT, "torch_inter_op": OPT_INT, "onnxruntime_intra_op": int, "onnxruntime_inter_op": int},
    "versions": {k: OPT_STR for k in ("numpy", "torch", "onnxruntime", "onnx", "tensorrt", "scan-deploy")},
    "model": {"name": str, "source": str, "weights": str, "bundles": dict},
    "inputs": {"images": list, "vocabulary": {"name": str, "size": int}, "resize": bool},
    "memory": {"rss": str, "gpu": str},
    "backends": dict,
}
BACKEND = {
    "precision": str, "providers": list, "device": str, "end_to_end": {**PERCENTILES, "runs": int}, "stages": dict,
    "images_per_s": NUM, "peak_rss_bytes": int, "rss_before_bytes": int, "gpu_peak_bytes": OPT_INT,
    "valid_regions": list, "label_agreement": (dict, type(None)),
    "text": {"cold_s": NUM, "warm_s": OPT_NUM, "cold_encoder_calls": OPT_INT, "warm_encoder_calls": OPT_INT},
}
SWEEP_ROW = {"value": (int, str), "mean_s": NUM, "p50_s": NUM, "p90_s": NUM}


def check_schema(data, spec: dict, where: str = "result") -> None:
    """Every key of `spec` is in `data` with one of its types; nested dicts are checked recursively."""
    assert isinstance(data, dict), f"{where} is {type(data).__name__}, not an object"
    for key, kind in spec.items():
        assert key in data, f"{where} lacks {key!r}"
        if isinstance(kind, dict):
            check_schema(data[key], kind, f"{where}.{key}")
        else:
            assert isinstance(data[key], kind) and not (isinstance(data[key], bool) and kind in (int, NUM)), \
                f"{where}.{key} = {data[key]!r} is not {kind}"


def check_bench_document(data: dict) -> None:
    check_schema(data, TOP)
    for name, entry in data["backends"].items():
        check_schema(entry, BACKEND, f"backends.{name}")
        for stage, summary in entry["stages"].items():
            check_schema(summary, PERCENTILES, f"backends.{name}.stages.{stage}")
        assert isinstance(data["ratios"][name], OPT_NUM)
    for image in data["inputs"]["images"]:
        check_schema(image, {"name": str, "height": int, "width": int}, "inputs.images[]")
    for sweep_name, sweep in data["sweeps"].items():
        check_schema(sweep, {"values": list, "measures": str, "backends": dict}, f"sweeps.{sweep_name}")
        for name, rows in sweep["backends"].items():
            assert len(rows) == len(sweep["values"]), f"sweeps.{sweep_name}.{name}: one row per value"
            for row in rows:
                check_schema(row, SWEEP_ROW, f"sweeps.{sweep_name}.backends.{name}[]")


# -- helpers ----------------------------------------------------------------------------------
def test_summarise_uses_linear_percentiles():
    summary = summarise([4.0, 1.0, 3.0, 2.0])
    assert summary == pytest.approx({"p50": 2.5, "p90": 3.7, "p99": 3.97, "mean": 2.5, "runs": 4})
    with pytest.raises(ValueError):
        summarise([])


@pytest.mark.skipif(not proc_available(), reason="the sampler reads /proc/self/statm")
def test_rss_sampler_sees_a_short_lived_allocation():
    with RssSampler() as rss:
        with rss.attribute("alloc"):
            block = np.ones(200 * 2**20 // 8)  # 200 MiB, every page touched
            time.sleep(0.05)
            del block  # freed inside the block: only the sampling thread can have seen it
    assert rss.peaks["alloc"] - rss.before["alloc"] >= 150e6


def test_backend_names():
    assert [n.name for n in parse_backends("eager, onnxruntime,onnxruntime-int8,tensorrt-fp16")] == [
        "eager", "onnxruntime", "onnxruntime-int8", "tensorrt-fp16"]
    assert parse_backends("onnxruntime-fp32")[0].name == "onnxruntime"
    # openvino alone is the runtime's default precision (bf16 where native): -fp32 is another backend.
    openvino = parse_backends("openvino,openvino-fp32,openvino-bf16,openvino-int8")
    assert [(n.name, n.precision, n.variant) for n in openvino] == [
        ("openvino", None, "fp32"), ("openvino-fp32", "fp32", "fp32"), ("openvino-bf16", "bf16", "fp32"),
        ("openvino-int8", "int8", "int8")]
    for bad, needle in (("pytorch", "choose from eager, onnxruntime"), ("eager-fp16", "unknown backend"),
                        ("onnxruntime,onnxruntime", "twice"), ("", "empty")):
        with pytest.raises(ScanError, match=needle):
            parse_backends(bad)


# -- one-line errors before any work (first: they also build the session bundle) ------------------
def _bench(*args):
    return runner.invoke(app, ["bench", *[str(a) for a in args]])


def _error_line(result) -> str:
    assert result.exit_code == 2, result.output + str(result.exception)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("args, needle", [
    (["--backends", "eager,pytorch"], "unknown backend 'pytorch'"),
    (["--image-size", "12y4"], "--image-size"),
    (["--image-size", "0"], "--image-size"),
    (["--runs", "0"], "--runs 0"),
    (["--sweep-proposals", "1,101"], "at most 100"),
    (["--sweep-vocab", "5,x"], "--sweep-vocab"),
    (["--vocab", "a,,b"], "empty class name"),
])
def test_bad_inputs(tiny_bundle, args, needle):
    assert needle in _error_line(_bench("--bundle", tiny_bundle.path, "--backends", "onnxruntime", *args))


def test_bad_model_sources(tiny_bundle, tmp_path):
    assert "bundle folder not found" in _error_line(_bench("--bundle", tmp_path / "nope"))
    assert "pass one model" in _error_line(_bench("--backends", "onnxruntime"))
    assert "pass one model" in _error_line(_bench("--bundle", tiny_bundle.path, "--preset", "tiny"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no image files" in _error_line(_bench("--bundle", tiny_bundle.path, "--images", empty))


def test_eager_needs_the_bundles_weights(tiny_bundle, tmp_path):
    import dataclasses

    from cli_jobs.bench_models import eager_model_for_bundle

    line = _error_line(_bench("--bundle", tiny_bundle.path, "--backends", "eager", "--seed", 3))
    assert "other weights than the bundle" in line and "--seed" in line
    checkpoint = tmp_path / "weights.safetensors"
    checkpoint.write_bytes(b"not the bundle's weights")
    assert "random weights, so --checkpoint does not apply" in _error_line(
        _bench("--bundle", tiny_bundle.path, "--backends", "eager", "--checkpoint", checkpoint))
    # A bundle of real weights: eager needs that very checkpoint.
    real = dataclasses.replace(tiny_bundle.manifest, model=dataclasses.replace(tiny_bundle.manifest.model,
                                                                               checkpoint_sha256="ab" * 32))
    with pytest.raises(ScanError, match="pass --checkpoint with the file it was exported from"):
        eager_model_for_bundle(tiny_bundle.path, real, None, None, 0, "cpu")
    with pytest.raises(ScanError, match="sha256 differs"):
        eager_model_for_bundle(tiny_bundle.path, real, checkpoint, None, 0, "cpu")


def test_gpu_backends_without_a_gpu(tiny_bundle):
    import torch

    from runtime.tensorrt import gpu_identity

    if torch.cuda.is_available() or gpu_identity()[0] is not None:
        pytest.skip("this machine has a GPU")
    assert "CUDA" in _error_line(_bench("--bundle", tiny_bundle.path, "--backends", "eager", "--device", "cuda"))
    assert "TensorRT" in _error_line(_bench("--bundle", tiny_bundle.path, "--backends", "tensorrt"))


# -- a tiny run through the CLI ------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = _bench("--bundle", tiny_bundle.path, "--backends", "eager,onnxruntime", "--image-size", "128x160",
                    "--vocab", VOCAB, "--runs", 2, "--warmup", 1, "--threads", 1, "--sweep-proposals", "1,4",
                    "--json", out / "bench.json", "--markdown", out / "bench.md", "--plot", out / "bench.png")
    assert result.exit_code == 0, result.output + str(result.exception)
    return result, out, json.loads((out / "bench.json").read_text())


def test_tiny_run_document(tiny_run):
    _, _, data = tiny_run
    check_bench_document(data)
    assert list(data["backends"]) == ["eager", "onnxruntime"]
    assert data["inputs"]["images"][0] | {"name": ""} == {"name": "", "height": 128, "width": 160}
    assert data["inputs"]["vocabulary"] == {"name": "custom", "size": 5} and data["inputs"]["resize"] is False
    assert data["model"]["source"] == "bundle" and data["model"]["weights"] == "random weights (seed 0)"
    assert data["threads"]["torch_intra_op"] == 1 and data["threads"]["onnxruntime_intra_op"] == 1
    assert data["ratios"]["eager"] == 1.0


def test_tiny_run_states_the_machine_rates_and_each_region_stage_rate(tiny_run):
    """A CPU run measures fp32, bf16 (where native) and int8 matrix products, and each backend's
    region stage in the same units; the tower's operations follow from the bundle's config."""
    from benchmarks.gemm_rates import tower_flops
    from runtime.cpu import cpu_info

    _, out, data = tiny_run
    compute = data["compute"]
    rates = compute["gemm"]["gflop_per_s"]
    assert rates["fp32"] > 0 and rates["int8"] > 0
    assert (rates["bf16"] is not None) == cpu_info().native_bf16
    vision = data["model"]["clip_vision"]
    assert compute["region_stage"]["tower_gflop_per_crop"] == round(tower_flops(vision) / 1e9, 2)
    for name, entry in data["backends"].items():
        stage = compute["region_stage"]["backends"][name]
        expected = entry["valid_regions"][0] * tower_flops(vision) / entry["stages"]["clip_adapter"]["mean"] / 1e9
        assert stage["gflop_per_s"] == pytest.approx(expected, rel=1e-3, abs=0.05)
        assert stage["share_of_int8_rate"] == pytest.approx(stage["gflop_per_s"] / rates["int8"], abs=1e-3)
    assert "share of the int8 rate" in (out / "bench.md").read_text()


def test_region_clip_of_vit_b_16_costs_32_7_gflop_per_crop():
    """ViT-B/16 at 224 is the usual 17.6 G multiply-adds, less the last block's work on the 196
    patch tokens (about 1.2 G: only the CLS token goes through it, keys and values aside)."""
    from benchmarks.gemm_rates import tower_flops

    assert tower_flops({"width": 768, "layers": 12, "patch_size": 16, "image_size": 224}) / 1e9 == pytest.approx(32.7, abs=0.05)


def test_tiny_run_measurements(tiny_run):
    _, _, data = tiny_run
    for name, entry in data["backends"].items():
        assert set(entry["stages"]) == STAGES, name
        for summary in [entry["end_to_end"], *entry["stages"].values()]:
            assert summary["p50"] <= summary["p90"] <= summary["p99"], name
        assert entry["end_to_end"]["runs"] == 2
        assert entry["peak_rss_bytes"] >= entry["rss_before_bytes"] > 0
        assert entry["gpu_peak_bytes"] is None  # CPU run
        assert len(entry["valid_regions"]) == 1 and entry["valid_regions"][0] > 0
    eager, ort = data["backends"]["eager"], data["backends"]["onnxruntime"]
    assert eager["label_agreement"] == {"mean": 1.0, "min": 1.0}
    assert 0.99 <= ort["label_agreement"]["min"] <= ort["label_agreement"]["mean"] <= 1.0  # the export gate's promise
    assert ort["valid_regions"] == eager["valid_regions"]
    assert ort["text"]["cold_encoder_calls"] >= 1 and ort["text"]["warm_encoder_calls"] == 0
    assert eager["text"]["warm_s"] is None and eager["text"]["cold_encoder_calls"] is None


def test_tiny_run_sweep_has_every_value_with_exactly_n_regions(tiny_run):
    _, _, data = tiny_run
    sweep = data["sweeps"]["proposals"]
    assert sweep["values"] == [1, 4]
    for name in ("eager", "onnxruntime"):
        rows = sweep["backends"][name]
        assert [r["value"] for r in rows] == [1, 4] and [r["valid"] for r in rows] == [1, 4], name


def test_tiny_run_outputs(tiny_run):
    result, out, _ = tiny_run
    table = (out / "bench.md").read_text()
    assert table in result.stdout  # the same tables on stdout
    rows = [line for line in table.splitlines() if line.startswith(("| eager |", "| onnxruntime |"))]
    assert len(rows) >= 2 and {r.split("|")[1].strip() for r in rows} == {"eager", "onnxruntime"}
    for png in (out / "bench.png", out / "bench_proposals.png"):
        with Image.open(png) as image:
            image.verify()
            assert image.format == "PNG"


# -- the export cache of --preset ----------------------------------------------------------------
def test_preset_reuses_its_cached_export(tiny_bundle, tmp_path):
    from cli_jobs.bench_models import bundle_cache_folder
    from scan_model.presets import preset

    config = json.loads(json.dumps(preset("tiny").to_dict()))
    folder = bundle_cache_folder(config, "random weights (seed 0)", "fp32")
    assert folder != bundle_cache_folder(config, "random weights (seed 1)", "fp32")
    assert folder != bundle_cache_folder(config, "random weights (seed 0)", "int8")
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.symlink_to(tiny_bundle.path, target_is_directory=True)  # as if exported by an earlier bench
    try:
        result = _bench("--preset", "tiny", "--backends", "onnxruntime", "--image-size", "64", "--vocab", "a,b",
                        "--runs", 1, "--warmup", 0, "--threads", 1, "--json", tmp_path / "r.json")
        assert result.exit_code == 0, result.output + str(result.exception)
        assert "reusing the bundle" in result.stderr
        data = json.loads((tmp_path / "r.json").read_text())
        assert data["model"]["bundles"] == {"onnxruntime": str(folder)}
        assert data["backends"]["onnxruntime"]["label_agreement"] is None and data["ratios"]["onnxruntime"] is None
        assert any("label_agreement is null" in n for n in data["notes"])
    finally:
        folder.unlink()

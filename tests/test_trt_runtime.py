"""The runtime's TensorRT side: engine folders, profiles, lazy builds with their sidecar, runners.

This machine has no GPU, so engines are built (TensorRT-RTX builds ahead of time on the CPU)
but never run: no test here constructs a TensorRT runtime without a GPU, which would crash
the process. Where the engine store needs a GPU's identity, the tests pass a FAKE one,
named `fake_gpu...` below; nothing else is faked. Tests that run engines skip here and run
on a GPU host with `tensorrt` (or `tensorrt_rtx`) and cuda-python or pycuda installed.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import PROJECT_ROOT, rtx_available
from runtime.engine_store import SIDECAR, cache_root, engine_plans, input_dims
from runtime.errors import BundleError, ScanError
from runtime.manifest import MANIFEST, EngineFolder, EnginePlan, read_manifest
from runtime.tensorrt import (
    ShapeRanges, TensorRTUnavailable, build_engine, engine_folder_name, gpu_identity, load_tensorrt, piece_profiles,
    profile_record,
)

GPU, GPU_DESCRIPTION = gpu_identity()


def _trt_problem() -> str | None:
    try:
        load_tensorrt()
    except TensorRTUnavailable as exc:
        return str(exc)
    return None


# Engines run only where a CUDA GPU answers and a TensorRT module imports; elsewhere these skip.
NO_GPU_REASON = f"{GPU_DESCRIPTION}: TensorRT engines cannot run on this machine" if GPU is None else _trt_problem()
needs_gpu = pytest.mark.skipif(NO_GPU_REASON is not None, reason=NO_GPU_REASON or "")
needs_rtx = pytest.mark.skipif(not rtx_available(), reason="tensorrt-rtx not installed (pip install 'scan-deploy[dev]')")

# FAKE GPU identities: this machine has no GPU to name its engine folder after, so the engine
# store is told these slugs; TensorRT-RTX still builds real plans for them ahead of time.
fake_gpu = "fake-gpu-test-sm00"
fake_gpu_other = "fake-gpu-other-sm80"

RANGES = ShapeRanges(height=(64, 320, 640), width=(64, 320, 640), classes=(1, 10, 200), masks=(1, 16, 100),
                     prompts=(1, 16, 256))


def _rtx_version() -> str:
    import tensorrt_rtx

    return tensorrt_rtx.__version__


def _quiet(line: str) -> None:
    pass


# -- a small bundle (text encoder only, fp32 and fp16) --------------------------------------------


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory) -> Path:
    from export.bundle import write_bundle
    from export.onnx_export import Shape
    from scan_model.loading import load_model

    model = load_model(None, "tiny", seed=0).model
    out = tmp_path_factory.mktemp("trt") / "bundle"
    write_bundle(model, out, None, {}, example=Shape(64, 96, 3, 2), checks=(Shape(96, 64, 5, 3),),
                 pieces=("text_encoder",), precision="fp16", report=_quiet)
    return out


@pytest.fixture
def bundle(small_bundle, tmp_path) -> Path:
    """A private copy: the tests write engines and sidecars into it."""
    return Path(shutil.copytree(small_bundle, tmp_path / "bundle"))


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """The user cache (platformdirs follows XDG_CACHE_HOME) inside the test's folder."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))


def _folder(gpu: str | None, precision: str = "fp32") -> str:
    return engine_folder_name(gpu, "tensorrt_rtx", _rtx_version(), precision)


def _plans(bundle: Path, manifest=None, precision: str = "fp32", gpu: str | None = fake_gpu, **kw) -> tuple[dict, list]:
    lines: list[str] = []
    plans = engine_plans(bundle, manifest or read_manifest(bundle), precision, gpu, backend="tensorrt_rtx",
                         report=lines.append, **kw)
    return plans, lines


def _with_exporter_folder(bundle: Path, folder: str, ranges: ShapeRanges = RANGES, precision: str = "fp32"):
    """The manifest as if `scan export --tensorrt` had made `folder` (a real RTX plan, a made-up GPU name)."""
    manifest = read_manifest(bundle)
    source = manifest.pieces["text_encoder"].variant(precision)
    result = build_engine(bundle / source.file, "text_encoder", ranges, "tensorrt_rtx", keep_engine=True,
                          precision=precision, inputs=input_dims(source))
    plan = bundle / "engines" / folder / "text_encoder.plan"
    plan.parent.mkdir(parents=True)
    plan.write_bytes(result.engine)
    from runtime.files import sha256_file

    record = EnginePlan(plan.relative_to(bundle).as_posix(), sha256_file(plan), plan.stat().st_size, onnx=source.file,
                        profile=profile_record(result.profile))
    manifest = copy.deepcopy(manifest)
    manifest.engines[folder] = EngineFolder("tensorrt_rtx", _rtx_version(), "test", precision,
                                            {k: list(v) for k, v in vars(ranges).items()}, None, {"text_encoder": record})
    return manifest, plan


# -- naming ------------------------------------------------------------------------------------


def test_engine_folder_names():
    assert engine_folder_name("nvidia-h100-80gb-hbm3-sm90", "tensorrt", "10.13.3.9", "fp16") == \
        "nvidia-h100-80gb-hbm3-sm90-trt10.13.3.9-fp16"
    assert engine_folder_name("nvidia-geforce-rtx-4090-sm89", "tensorrt_rtx", "1.7.1.116", "fp32") == \
        "nvidia-geforce-rtx-4090-sm89-trtrtx1.7.1.116-fp32"
    assert engine_folder_name(None, "tensorrt_rtx", "1.7.1.116", "fp32") == "aot-trtrtx1.7.1.116-fp32"
    with pytest.raises(ValueError, match="GPU slug is required"):
        engine_folder_name(None, "tensorrt", "10.13.3.9", "fp32")  # standard TensorRT builds only for its GPU
    with pytest.raises(ValueError, match="unknown TensorRT module"):
        engine_folder_name("x", "tensorrt_llm", "1", "fp32")


@needs_rtx
def test_export_names_its_folders_like_the_runtime():
    from export.engines import engine_folder

    if GPU is None:
        assert engine_folder("tensorrt_rtx", "fp16")[0] == _folder(None, "fp16")
    else:
        assert engine_folder("tensorrt_rtx", "fp16")[0] == _folder(GPU, "fp16")


def test_errors_are_scan_errors():
    from export.engines import EngineBuildError

    assert issubclass(TensorRTUnavailable, ScanError) and issubclass(EngineBuildError, ScanError)
    with pytest.raises(TensorRTUnavailable, match="install 'tensorrt'.*or 'tensorrt-rtx'"):
        load_tensorrt(("tensorrt_that_does_not_exist",))


# -- profiles from manifest input specs ---------------------------------------------------------

# Input specs as a tiny bundle's manifest records them, and the profiles the onnx-based
# `export/tensorrt.py:piece_profiles` of commit 9e01ca2 computed from the same graphs for RANGES.
# That code had no entry for clip_adapter's `shift_keys` (added with manifest schema 2), so its
# clip_adapter builds failed ("shift_keys is missing dimensions in profile 0"); its range is `masks`.
SPECS = {
    "image_encoder": {"image": [1, 3, "32*h32", "32*w32"], "clip_image": [1, 3, 224, 224]},
    "mask_decoder": {
        "mask_features": [1, 64, "8*h32", "8*w32"], "features_0": [1, 64, "h32", "w32"],
        "features_1": [1, 64, "2*h32", "2*w32"], "features_2": [1, 64, "4*h32", "4*w32"],
        "clip_context": [1, 588, 64], "global_cls": [1, 64], "text_classifier": ["classes_plus_one", 64],
    },
    "clip_adapter": {
        "image": [3, "height", "width"], "mask_probs": ["masks", "height", "width"], "mask_threshold": [],
        "shift_tokens": [3, 64], "text_classifier": ["classes_plus_one", 64], "shift_counts": [197],
        "shift_keys": [3, "masks", 196],
    },
    "text_encoder": {"tokens": ["prompts", "sequence"]},
}
EXPECTED = {
    "image_encoder": {"image": ((1, 3, 64, 64), (1, 3, 320, 320), (1, 3, 640, 640))},
    "mask_decoder": {
        "mask_features": ((1, 64, 16, 16), (1, 64, 80, 80), (1, 64, 160, 160)),
        "features_0": ((1, 64, 2, 2), (1, 64, 10, 10), (1, 64, 20, 20)),
        "features_1": ((1, 64, 4, 4), (1, 64, 20, 20), (1, 64, 40, 40)),
        "features_2": ((1, 64, 8, 8), (1, 64, 40, 40), (1, 64, 80, 80)),
        "text_classifier": ((2, 64), (11, 64), (201, 64)),
    },
    "clip_adapter": {
        "image": ((3, 64, 64), (3, 320, 320), (3, 640, 640)),
        "mask_probs": ((1, 64, 64), (16, 320, 320), (100, 640, 640)),
        "text_classifier": ((2, 64), (11, 64), (201, 64)),
        "shift_keys": ((3, 1, 196), (3, 16, 196), (3, 100, 196)),  # new: not in the onnx-based code
    },
    "text_encoder": {"tokens": ((1, 2), (16, 16), (256, 77))},  # prompts x tokens, cut to the longest
}


@pytest.mark.parametrize("piece", list(SPECS))
def test_profiles_from_manifest_specs(piece):
    assert piece_profiles(piece, SPECS[piece], RANGES) == EXPECTED[piece]


def test_profiles_of_a_real_bundle_match_its_onnx_graph(small_bundle):
    """The manifest's specs and the saved graph's inputs give the same profile (fp32 and fp16 pieces)."""
    import onnx

    manifest = read_manifest(small_bundle)
    for precision in ("fp32", "fp16"):
        source = manifest.pieces["text_encoder"].variant(precision)
        proto = onnx.load(str(small_bundle / source.file), load_external_data=False)
        graph = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in proto.graph.input}
        assert piece_profiles("text_encoder", input_dims(source), RANGES) == \
            piece_profiles("text_encoder", graph, RANGES) == EXPECTED["text_encoder"]


def test_a_symbolic_axis_without_a_range_is_refused():
    # A bundle from before the cut keeps its fixed 77 tokens in the profile.
    assert piece_profiles("text_encoder", {"tokens": ["prompts", 77]}, RANGES) == {"tokens": ((1, 77), (16, 77), (256, 77))}
    with pytest.raises(ScanError, match="symbolic axes \\[2\\] that no TensorRT shape range covers"):
        piece_profiles("text_encoder", {"tokens": ["prompts", "sequence", "extra"]}, RANGES)
    with pytest.raises(ScanError, match="'extra' has symbolic axes"):
        piece_profiles("text_encoder", {"tokens": ["prompts", 77], "extra": ["n"]}, RANGES)


# -- torch- and onnx-free ------------------------------------------------------------------------


@needs_rtx
def test_runtime_builds_engines_without_torch_or_onnx(small_bundle, tmp_path):
    """The runtime's TensorRT modules, and a build through them, import neither torch, onnx nor export code."""
    code = (
        "import sys; from pathlib import Path\n"
        "import runtime.tensorrt, runtime.trt_engine, runtime.engine_store\n"
        "from runtime.manifest import read_manifest\n"
        "from runtime.engine_store import input_dims\n"
        f"root = Path({str(small_bundle)!r}); source = read_manifest(root).pieces['text_encoder']\n"
        "r = runtime.tensorrt.build_engine(root / source.file, 'text_encoder', runtime.tensorrt.ShapeRanges(), "
        "'tensorrt_rtx', inputs=input_dims(source))\n"
        "assert r.built, r.summary()\n"
        "bad = [m for m in ('torch', 'onnx', 'scan_model', 'export') if m in sys.modules]\n"
        "assert not bad, bad; print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "ok" in result.stdout, result.stdout + result.stderr


# -- no GPU here: clear refusals, nothing built, no TensorRT runtime constructed -----------------------


@pytest.mark.skipif(GPU is not None, reason="a CUDA GPU answers here: the no-GPU message cannot be checked")
def test_without_a_gpu_engines_are_refused_in_one_line(bundle):
    from runtime.trt_engine import TensorRTRunner, open_engines

    pattern = "no CUDA GPU answers .*TensorRT engines cannot run on this machine; .*--backend onnxruntime"
    if _trt_problem() is not None:
        pattern = "no TensorRT available"
    with pytest.raises(ScanError, match=pattern) as info:
        open_engines(bundle, read_manifest(bundle), "fp32")
    assert "\n" not in str(info.value)
    assert not (bundle / "engines").exists()  # refused before building anything
    with pytest.raises(ScanError, match=pattern):
        TensorRTRunner(bundle / "engines" / "any" / "text_encoder.plan")


# -- the engine store (fake GPU identity, real TensorRT-RTX builds) -------------------------------


@needs_rtx
def test_missing_engines_are_built_once_and_recorded_in_a_sidecar(bundle):
    manifest_bytes = (bundle / MANIFEST).read_bytes()
    folder = _folder(fake_gpu)
    plans, lines = _plans(bundle, ranges=RANGES)
    plan = plans["text_encoder"]
    assert plan == bundle / "engines" / folder / "text_encoder.runtime.plan"
    assert "building TensorRT engine for text_encoder (first use on this GPU; minutes)" in lines
    sidecar = json.loads((plan.parent / SIDECAR).read_text())
    entry = sidecar["pieces"]["text_encoder"]
    source = read_manifest(bundle).pieces["text_encoder"]
    from runtime.files import sha256_file

    assert entry["file"] == plan.name and entry["bytes"] == plan.stat().st_size and entry["sha256"] == sha256_file(plan)
    assert entry["onnx"] == source.file and entry["onnx_sha256"] == source.sha256
    assert entry["profile"] == {"tokens": {"min": [1, 2], "opt": [16, 16], "max": [256, 77]}}
    assert sidecar["backend"] == "tensorrt_rtx" and sidecar["precision"] == "fp32"
    assert (bundle / MANIFEST).read_bytes() == manifest_bytes  # the exporter's manifest is never rewritten

    again, lines = _plans(bundle)  # no ranges asked: any plan of this folder will do
    assert again == plans and not any("building" in line for line in lines)
    again, lines = _plans(bundle, ranges=RANGES)
    assert again == plans and not any("building" in line for line in lines)


@needs_rtx
def test_fp16_engines_are_built_from_the_fp16_piece(bundle):
    plans, _ = _plans(bundle, precision="fp16", ranges=RANGES)
    plan = plans["text_encoder"]
    assert plan.parent.name == _folder(fake_gpu, "fp16")
    entry = json.loads((plan.parent / SIDECAR).read_text())["pieces"]["text_encoder"]
    assert entry["onnx"] == "text_encoder.fp16.onnx"
    assert entry["onnx_sha256"] == read_manifest(bundle).pieces["text_encoder"].fp16.sha256


@needs_rtx
def test_stale_or_damaged_sidecar_plans_are_rebuilt(bundle):
    plans, _ = _plans(bundle, ranges=RANGES)
    sidecar = plans["text_encoder"].parent / SIDECAR
    data = json.loads(sidecar.read_text())
    data["pieces"]["text_encoder"]["onnx_sha256"] = "0" * 64  # as if built from an earlier export of the piece
    sidecar.write_text(json.dumps(data))
    again, lines = _plans(bundle)
    assert any("rebuilding (stale)" in line for line in lines)
    assert any("building TensorRT engine for text_encoder" in line for line in lines)
    entry = json.loads(sidecar.read_text())["pieces"]["text_encoder"]
    assert entry["onnx_sha256"] == read_manifest(bundle).pieces["text_encoder"].sha256

    with open(again["text_encoder"], "r+b") as handle:  # a truncated plan (a full disk, a killed copy)
        handle.truncate(1000)
    _, lines = _plans(bundle)
    assert any("missing or damaged; rebuilding" in line for line in lines)
    assert again["text_encoder"].stat().st_size == json.loads(sidecar.read_text())["pieces"]["text_encoder"]["bytes"]


@needs_rtx
def test_other_ranges_get_an_engine_of_their_own(bundle):
    plans, _ = _plans(bundle, ranges=RANGES)
    wider = ShapeRanges(**{**vars(RANGES), "prompts": (1, 32, 512)})
    again, lines = _plans(bundle, ranges=wider)
    assert any("building TensorRT engine" in line for line in lines)
    entry = json.loads((again["text_encoder"].parent / SIDECAR).read_text())["pieces"]["text_encoder"]
    assert entry["profile"]["tokens"]["max"] == [512, 77]


@needs_rtx
def test_exporter_plans_of_this_folder_are_verified_and_used(bundle):
    folder = _folder(fake_gpu)
    manifest, plan = _with_exporter_folder(bundle, folder)
    plans, lines = _plans(bundle, manifest)
    assert plans == {"text_encoder": plan} and not any("building" in line for line in lines)

    data = bytearray(plan.read_bytes())  # same size, one byte changed: refused like any altered bundle file
    data[len(data) // 2] ^= 0xFF
    plan.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        _plans(bundle, manifest)

    plan.unlink()  # missing: built beside it, recorded in the sidecar, the manifest's name left alone
    plans, lines = _plans(bundle, manifest)
    assert plans["text_encoder"] == plan.with_name("text_encoder.runtime.plan")
    assert "building TensorRT engine for text_encoder (first use on this GPU; minutes)" in lines


@needs_rtx
@pytest.mark.parametrize("other", ["other_gpu", "other_version", "other_precision"])
def test_engines_of_another_gpu_or_version_are_never_used(bundle, other):
    folder = _folder(fake_gpu)
    foreign = {
        "other_gpu": _folder(fake_gpu_other),
        "other_version": engine_folder_name(fake_gpu, "tensorrt_rtx", "0.9.0.1", "fp32"),
        "other_precision": _folder(fake_gpu, "fp16"),
    }[other]
    manifest, foreign_plan = _with_exporter_folder(bundle, foreign, precision="fp16" if other == "other_precision" else "fp32")
    with pytest.raises(ScanError, match="no TensorRT engine for text_encoder") as info:
        _plans(bundle, manifest, build_missing=False)
    message = str(info.value)
    assert f"engines/{foreign}" in message and f"this machine needs engines/{folder}" in message and "\n" not in message

    plans, lines = _plans(bundle, manifest)
    assert plans["text_encoder"].parent.name == folder and plans["text_encoder"] != foreign_plan
    assert any(f"engines/{foreign}" in line and f"this machine needs engines/{folder}: building it" in line for line in lines)


@needs_rtx
def test_a_read_only_bundle_builds_into_the_user_cache(bundle, tmp_path):
    # A bundle where engines/ cannot be created (a file stands there); chmod would not stop root.
    (bundle / "engines").write_text("not a folder")
    plans, lines = _plans(bundle, ranges=RANGES)
    target = tmp_path / "user-cache" / "scan-deploy" / "engines"
    assert cache_root(bundle).parent == target
    assert plans["text_encoder"].parent == cache_root(bundle) / _folder(fake_gpu)
    assert any("is not writable: building engines into the user cache" in line for line in lines)
    again, lines = _plans(bundle)
    assert again == plans and not any("building" in line for line in lines)


@needs_rtx
def test_no_gpu_on_this_machine_means_the_aot_folder_for_rtx(bundle):
    """Without a GPU, RTX engines belong to `aot-trtrtx...`: the folder `scan export --tensorrt` writes here."""
    plans, _ = _plans(bundle, gpu=None, ranges=RANGES)
    assert plans["text_encoder"].parent.name == _folder(None)


# -- running engines (GPU hosts) ------------------------------------------------------------------


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


@needs_gpu
@pytest.mark.parametrize("precision, tolerance", [("fp32", 1e-3), ("fp16", 2e-2)])
def test_tensorrt_runner_matches_onnxruntime(bundle, precision, tolerance):
    import onnxruntime as ort

    from runtime.trt_engine import open_engines

    manifest = read_manifest(bundle)
    lines: list[str] = []
    runners = open_engines(bundle, manifest, precision, ranges=RANGES, report=lines.append)
    runner = runners["text_encoder"]
    assert runner.input_names == ["tokens"] and runner.output_names == ["text_features"]
    session = ort.InferenceSession(str(bundle / manifest.pieces["text_encoder"].file), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    for batch in (3, 16, 3, 256):
        tokens = rng.integers(1, 49406, size=(batch, 77), dtype=np.int64)
        ours = runner.run({"tokens": tokens})["text_features"]
        ref = session.run(None, {"tokens": tokens})[0]
        assert ours.shape == ref.shape and ours.dtype == np.float32
        assert _rel(ours, ref) <= tolerance, (precision, batch, _rel(ours, ref))
    assert len(runner._buffers) == 3  # buffers allocated once per shape set, reused for the repeat
    with pytest.raises(ScanError, match="outside the engine's profile"):
        runner.run({"tokens": np.ones((257, 77), np.int64)})
    runner.close()

    reopened = open_engines(bundle, manifest, precision, ranges=RANGES, report=lines.append)["text_encoder"]
    assert sum("building TensorRT engine" in line for line in lines) == 1  # the second open reuses the plan
    reopened.close()


@needs_gpu
@pytest.mark.parametrize("precision, required", [("fp32", 0.999), ("fp16", 0.99)])
def test_segmenter_on_tensorrt_agrees_with_onnxruntime(tiny_bundle, tmp_path, precision, required):
    """DESIGN.md: TensorRT labels identical to ONNX Runtime fp32 on >= 99.9% (fp32) / >= 99% (fp16) of pixels."""
    from runtime import Segmenter
    from runtime.synthetic import synthetic_scene
    from runtime.vocab import benchmark_vocabularies

    root = Path(shutil.copytree(tiny_bundle.path, tmp_path / "bundle"))  # engines built here, not in the shared bundle
    names = benchmark_vocabularies()["voc20"]
    reference = Segmenter(root, backend="onnxruntime", precision="fp32", resize=False, cache_dir=tmp_path / "text")
    tensorrt = Segmenter(root, backend="tensorrt", precision=precision, resize=False, cache_dir=tmp_path / "text")
    for segmenter in (reference, tensorrt):
        segmenter.set_vocabulary(names)
    for seed, (height, width) in enumerate([(128, 160), (224, 96), (320, 320)]):
        image = synthetic_scene(height, width, seed=seed)
        ours = tensorrt.segment(image).label_map
        ref = reference.segment(image).label_map
        agreement = float((ours == ref).mean())
        print(precision, (height, width), agreement)
        assert agreement >= required, (precision, (height, width), agreement)

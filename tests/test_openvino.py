"""`Segmenter(..., backend="openvino")` on the session's `tiny` bundle: agreement with ONNX Runtime,
native-BF16 detection, the per-piece fallback record and the compiled-model cache.

Thresholds (tiny preset, random weights, synthetic scenes at their own size):
- f32: labels equal ONNX Runtime's on >= 99.9% of pixels (DESIGN.md's fp32 bar); both engines run
  the same fp32 graphs, so only summation order differs (measured 100%, sem_seg 1e-5 relative).
- bf16: random weights leave near-ties between classes, and bfloat16's 8-bit mantissa (relative
  rounding 4e-3) reorders them, so label agreement on this model says little (docs/performance.md
  rests bf16 quality on a trained model). What holds on any CPU with native BF16 is each piece's
  numeric error: every output within a cosine of 0.99 of fp32 (bf16 rounding of one 64-wide dot
  product is ~4e-3 relative; the tiny towers stack a few dozen), and labels at least 50% equal
  (measured 100% on these scenes; a broken graph gives ~1/K).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest

from runtime.cpu import cpu_info, parse_cpuinfo
from runtime.segmenter import PIECE_NAMES, Segmenter
from runtime.synthetic import synthetic_scene

pytest.importorskip("openvino", reason="pip install openvino")

NAMES = ["sky", "grass", "house", "sun", "ball"]
SIZES = [(96, 128), (128, 96), (70, 101)]
F32_AGREEMENT = 0.999
BF16_AGREEMENT = 0.5
BF16_COSINE = 0.99


def _open(bundle, cache, **kwargs) -> Segmenter:
    segmenter = Segmenter(bundle, resize=False, cache_dir=cache, threads=2, report=kwargs.pop("report", None) or (lambda line: None),
                          **kwargs)
    segmenter.set_vocabulary(NAMES)
    return segmenter


@pytest.fixture(scope="module")
def reference(tiny_bundle, tmp_path_factory):
    return _open(tiny_bundle.path, tmp_path_factory.mktemp("ort"), backend="onnxruntime", precision="fp32")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("openvino_cache")


@pytest.fixture(scope="module")
def openvino_f32(tiny_bundle, cache):
    return _open(tiny_bundle.path, cache, backend="openvino", precision="fp32")


def _agreement(a, b) -> float:
    return float(np.mean([np.mean(x.label_map == y.label_map) for x, y in zip(a, b)]))


def test_openvino_f32_labels_equal_onnxruntime(openvino_f32, reference):
    images = [synthetic_scene(*size, seed=3) for size in SIZES]
    ours, ref = [openvino_f32.segment(i, return_scores=True) for i in images], [reference.segment(i, return_scores=True) for i in images]
    rel = max(float(np.abs(a.sem_seg - b.sem_seg).max() / np.abs(b.sem_seg).max()) for a, b in zip(ours, ref))
    print(f"f32: labels {_agreement(ours, ref):.5f}, sem_seg rel {rel:.1e}")
    assert _agreement(ours, ref) >= F32_AGREEMENT and rel < 1e-3
    assert [a.num_regions for a in ours] == [b.num_regions for b in ref]
    assert openvino_f32.backend == "openvino" and openvino_f32.precision == "fp32"
    assert all(r.precision == "fp32" for r in openvino_f32.runners.values())


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))


@pytest.mark.skipif(not cpu_info().native_bf16, reason=f"{cpu_info().model} has no native BF16 (AVX512-BF16 or AMX)")
def test_openvino_bf16_pieces_stay_close_to_fp32_and_labels_agree(tiny_bundle, cache, openvino_f32, reference):
    bf16 = _open(tiny_bundle.path, cache, backend="openvino", precision="bf16")
    assert bf16.precision == "bf16" and all(r.settings.precision in ("bf16", "f32") for r in bf16.runners.values())
    # Per piece: the same feeds through the bf16 and f32 compilations.
    tokens = np.asarray([[49406, 320, 1125, 539, 320, 2368, 269, 49407]], dtype=np.int64)
    worst = {}
    for name, feeds in _piece_feeds(openvino_f32, tokens).items():
        low, full = bf16.runners[name].run(feeds), openvino_f32.runners[name].run(feeds)
        for output, value in full.items():
            if value.dtype.kind == "f" and value.size:
                worst[f"{name}.{output}"] = _cosine(low[output], value)
    print("bf16 cosine vs f32:", {k: round(v, 5) for k, v in worst.items()})
    assert min(worst.values()) >= BF16_COSINE, worst
    images = [synthetic_scene(*size, seed=3) for size in SIZES]
    agreement = _agreement([bf16.segment(i) for i in images], [reference.segment(i) for i in images])
    print(f"bf16 labels vs ONNX Runtime fp32: {agreement:.4f}; fallbacks: {bf16.fallbacks}")
    assert agreement >= BF16_AGREEMENT


def _piece_feeds(segmenter: Segmenter, tokens: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Real inputs of every piece for one scene, recorded from an f32 run."""
    recorded: dict[str, dict[str, np.ndarray]] = {}

    class Recorder:
        def __init__(self, name, runner):
            self.name, self.runner = name, runner

        def run(self, feeds):
            recorded.setdefault(self.name, {k: np.array(v) for k, v in feeds.items()})
            return self.runner.run(feeds)

    runners = segmenter.runners
    segmenter.runners = {name: Recorder(name, r) for name, r in runners.items()}
    try:
        segmenter.segment(synthetic_scene(96, 128, seed=3))
    finally:
        segmenter.runners = runners
    recorded["text_encoder"] = {"tokens": tokens}
    return recorded


def test_cpu_without_native_bf16_runs_fp32_and_says_so(tiny_bundle, cache):
    emulating = replace(cpu_info(), native_bf16=False)
    lines: list[str] = []
    asked = _open(tiny_bundle.path, cache, backend="openvino", precision="bf16", cpu=emulating, report=lines.append)
    assert asked.precision == "fp32" and all(r.settings.precision == "f32" for r in asked.runners.values())
    assert any("no native BF16" in note for note in asked.notes) and any("no native BF16" in line for line in lines)
    default = _open(tiny_bundle.path, cache, cpu=emulating)
    assert (default.backend, default.precision) == ("openvino", "fp32")
    assert "precision fp32: no native BF16 on this CPU" in default.notes


def test_native_bf16_is_read_from_the_cpu_flags_not_from_openvino():
    """OpenVINO lists BF16 on AVX-512 CPUs that only emulate it; the flags decide."""
    emulated = parse_cpuinfo("model name\t: Intel Xeon Gold 6248\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    native = parse_cpuinfo("model name\t: AMD EPYC 9R14\nflags\t\t: avx2 avx512f avx512_vnni avx512_bf16\n")
    amx = parse_cpuinfo("model name\t: Intel Xeon Platinum 8480+\nflags\t\t: avx2 avx512f amx_tile amx_bf16 amx_int8\n")
    assert (emulated.native_bf16, native.native_bf16, amx.native_bf16) == (False, True, True)
    assert emulated.features() == {"AVX2": True, "AVX-512": True, "VNNI": True, "BF16": False, "AMX": False}
    assert amx.amx and not native.amx and native.vnni
    assert len({emulated.key(), native.key(), amx.key()}) == 3  # compiled models never shared between them


def test_second_open_imports_compiled_models_from_the_cache(tiny_bundle, openvino_f32, cache):
    again = _open(tiny_bundle.path, cache, backend="openvino", precision="fp32")
    assert all(r.from_cache for r in again.runners.values())
    image = synthetic_scene(96, 128, seed=8)
    np.testing.assert_array_equal(again.segment(image).label_map, openvino_f32.segment(image).label_map)


def test_damaged_compiled_model_cache_entry_is_rebuilt_never_used(tiny_bundle, openvino_f32, tmp_path, cache):
    private = tmp_path / "cache"
    shutil.copytree(cache, private)
    blobs = sorted((private / "openvino").glob(f"*-{cpu_info().key()}-f32-t2/mask_decoder.blob"))
    assert len(blobs) == 1
    damaged = bytearray(blobs[0].read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    blobs[0].write_bytes(bytes(damaged))
    lines: list[str] = []
    reopened = _open(tiny_bundle.path, private, backend="openvino", precision="fp32", report=lines.append)
    assert not reopened.runners["mask_decoder"].from_cache
    assert all(reopened.runners[name].from_cache for name in PIECE_NAMES if name != "mask_decoder")
    assert any("damaged compiled-model cache entry" in line and "mask_decoder" in line for line in lines)
    image = synthetic_scene(96, 128, seed=8)
    np.testing.assert_array_equal(reopened.segment(image).label_map, openvino_f32.segment(image).label_map)
    record = json.loads(blobs[0].with_suffix(".json").read_text())
    assert hashlib.sha256(blobs[0].read_bytes()).hexdigest() == record["blob_sha256"]  # rewritten whole
    assert _open(tiny_bundle.path, private, backend="openvino", precision="fp32").runners["mask_decoder"].from_cache


def test_a_recorded_bf16_fallback_is_applied_and_reported(tiny_bundle, tmp_path):
    """A piece that failed in bf16 once starts from the setting it fell back to, and says so every time."""
    first = _open(tiny_bundle.path, tmp_path, backend="openvino", precision="bf16", cpu=replace(cpu_info(), native_bf16=True))
    runner = first.runners["clip_adapter"]
    record = runner._fallback_record()
    note = "clip_adapter: OpenVINO failed to compile in bf16-t2 (test record); running f32"
    record.write_text(json.dumps({"settings": {"precision": "f32", "threads": 2, "snippets": True}, "note": note}))
    lines: list[str] = []
    again = _open(tiny_bundle.path, tmp_path, backend="openvino", precision="bf16", cpu=replace(cpu_info(), native_bf16=True),
                  report=lines.append)
    assert again.runners["clip_adapter"].settings.precision == "f32"
    assert again.fallbacks["clip_adapter"].startswith(note) and any(note in n for n in again.notes)
    assert any(note in line for line in lines)

"""The numeric gate of reduced precision: each int8 file and each bf16 run of a piece against fp32.

Label agreement on a model with random weights says nothing about bf16 or int8: its classes sit
within rounding of each other everywhere, so a change far below any real error picks another
class for the whole image. What holds on any model is the error of each output of each piece,
measured on the calibration calls (export/calibration.py) against the fp32 outputs recorded
there: the smallest cosine similarity over the calls (each call's output flattened) and the
largest max |low - fp32| / max |fp32|. Both go to the manifest; the cosine decides.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from runtime.manifest import PrecisionCheck

from .calibration import CHECK_CALLS, Recording

# The smallest cosine an output may keep. Measured (docs/performance.md): calibrated int8 on the
# trained `tiny` keeps >= 0.999 on every output of both pieces, on ONNX Runtime and OpenVINO;
# bf16 keeps >= 0.99 on the pieces without masked attention. Random weights (vitb preset) keep
# int8 >= 0.99. A quantiser gone wrong (scales off, a broken scope) falls far below these.
MIN_COSINE = {"int8": 0.99, "bf16": 0.99}


def output_errors(reference: list[dict[str, np.ndarray]], got: list[dict[str, np.ndarray]]
                  ) -> tuple[dict[str, float], dict[str, float]]:
    """(smallest cosine, largest relative error) per output over paired calls. Bool outputs: the
    smallest share of equal values, and 1 where any value differs."""
    cosine: dict[str, float] = {}
    rel: dict[str, float] = {}
    for ref, low in zip(reference, got):
        for name, expected in ref.items():
            a, b = np.asarray(expected), np.asarray(low[name])
            if a.dtype == bool:
                c, r = float((a == b).mean()) if a.size else 1.0, float((a != b).any())
            else:
                a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
                norms = np.linalg.norm(a) * np.linalg.norm(b)
                c = float(a @ b / norms) if norms > 0 else float(np.array_equal(a, b))
                peak = np.abs(a).max(initial=0.0)
                r = float(np.abs(a - b).max(initial=0.0) / peak) if peak > 0 else float(np.abs(b).max(initial=0.0))
                if not np.isfinite(b).all():
                    c, r = -1.0, float("inf")
            cosine[name] = min(cosine.get(name, 1.0), c)
            rel[name] = max(rel.get(name, 0.0), r)
    return cosine, rel


def check_piece(name: str, path: Path, sha256: str, recording: Recording, engine: str, precision: str,
                inputs: str, threads: int | None = None, cpu=None) -> PrecisionCheck:
    """Run `name`'s file at `path` on the recorded calls with `engine` ("onnxruntime" runs int8
    files; "openvino" compiles with the bf16 hint for "bf16", and for "int8" where `cpu` is
    natively BF16, as the runtime does) and compare with the recorded fp32 outputs."""
    calls = recording.calls(name, CHECK_CALLS)
    runner = _runner(name, path, sha256, engine, precision, threads, cpu)
    got = [runner.run(recording.inputs[name][i]) for i in calls]
    cosine, rel = output_errors([recording.outputs[name][i] for i in calls], got)
    required = MIN_COSINE[precision]
    compiled = runner.settings.label() if engine == "openvino" else "onnxruntime"  # after any fallback
    return PrecisionCheck(engine=engine, precision=precision, compiled=compiled, inputs=inputs, calls=len(calls),
                          min_cosine=cosine, max_rel=rel, required_cosine=required,
                          passed=bool(cosine) and min(cosine.values()) >= required)


def _runner(name, path, sha256, engine, precision, threads, cpu):
    if engine == "onnxruntime":
        from runtime.onnxruntime_backend import OnnxRuntimeRunner

        return OnnxRuntimeRunner(name, path, None, threads, "all", precision)
    from runtime.cpu import cpu_info
    from runtime.openvino_backend import OpenVinoRunner, compile_hint

    cpu, quantised = cpu or cpu_info(), precision == "int8"
    return OpenVinoRunner(name, path, sha256, compile_hint(precision, cpu, quantised), threads, cache_dir=False,
                          cpu=cpu, quantised=quantised)

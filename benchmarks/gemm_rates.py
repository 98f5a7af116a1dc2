"""This machine's matrix-product rates, and how close a backend's region stage comes to them.

`gemm_rates` times one n-cube MatMul compiled by OpenVINO for the CPU:

- fp32, compiled f32;
- bf16, the same graph compiled bf16 (only where the CPU has native BF16);
- int8, a QDQ graph (uint8 activations, int8 per-tensor weights, as the bundle's int8 pieces
  are written) that OpenVINO runs as an integer product (VNNI or AMX where present).

Each rate is 2 n^3 operations over the median of `calls` timed calls, after one warm-up.

`region_rates` turns a `scan bench` entry into the rate its region stage reached. The work is
the CLIP visual tower's operations per crop (from the model config) times the valid regions, and
it is compared with the int8 rate: "fp32-equivalent" operations per second, since an int8
product does the same multiply-adds with narrower numbers.

    python -m benchmarks.gemm_rates --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import report

SIZE = 2048


def _matmul_onnx(path: Path, n: int, quantised: bool, seed: int = 0) -> None:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((n, n)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])
    if not quantised:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["y"])]
        inits = [numpy_helper.from_array(weight, "w")]
    else:
        scale = float(np.abs(weight).max() / 127)
        inits = [
            numpy_helper.from_array(np.clip(np.round(weight / scale), -127, 127).astype(np.int8), "w_q"),
            numpy_helper.from_array(np.array(scale, np.float32), "w_scale"),
            numpy_helper.from_array(np.array(0, np.int8), "w_zero"),
            numpy_helper.from_array(np.array(8.0 / 255, np.float32), "x_scale"),
            numpy_helper.from_array(np.array(128, np.uint8), "x_zero"),
        ]
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "x_scale", "x_zero"], ["x_q"]),
            helper.make_node("DequantizeLinear", ["x_q", "x_scale", "x_zero"], ["x_dq"]),
            helper.make_node("DequantizeLinear", ["w_q", "w_scale", "w_zero"], ["w_dq"]),
            helper.make_node("MatMul", ["x_dq", "w_dq"], ["y"]),
        ]
    graph = helper.make_graph(nodes, "gemm", [x], [y], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def _rate(path: Path, n: int, hint: str, threads: int, calls: int) -> float:
    """GFLOP/s of the MatMul in `path` compiled with `hint`."""
    import openvino as ov

    from runtime.openvino_backend import CompileSettings

    # The runtime's own compile settings, so the rates are those its pieces can reach.
    compiled = ov.Core().compile_model(str(path), "CPU", CompileSettings(hint, threads).config())
    request = compiled.create_infer_request()
    x = np.random.default_rng(1).uniform(-4, 4, (n, n)).astype(np.float32)
    request.infer({0: x})  # warm-up: packing, first-touch
    seconds = []
    for _ in range(calls):
        start = time.perf_counter()
        request.infer({0: x})
        seconds.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(seconds) / 1e9


def gemm_rates(threads: int, n: int = SIZE, calls: int = 7) -> dict:
    """{"fp32": GFLOP/s, "bf16": GFLOP/s or None without native BF16, "int8": GFLOP/s, ...}."""
    from runtime.cpu import cpu_info

    native_bf16 = cpu_info().native_bf16
    with tempfile.TemporaryDirectory(prefix="scan-gemm-") as folder:
        plain, quantised = Path(folder) / "fp32.onnx", Path(folder) / "int8.onnx"
        _matmul_onnx(plain, n, quantised=False)
        _matmul_onnx(quantised, n, quantised=True)
        rates = {
            "fp32": _rate(plain, n, "f32", threads, calls),
            "bf16": _rate(plain, n, "bf16", threads, calls) if native_bf16 else None,
            "int8": _rate(quantised, n, "f32", threads, calls),
        }
    return {"engine": "openvino", "size": n, "threads": threads, "calls": calls,
            "gflop_per_s": {k: (round(v, 1) if v is not None else None) for k, v in rates.items()},
            "note": None if native_bf16 else "no native BF16 on this CPU: no bf16 rate"}


def tower_flops(vision: dict) -> float:
    """Operations (2 per multiply-add) of one crop through the region CLIP, a ViT visual tower of
    config `vision` whose last block computes the CLS token only (the head reads nothing else;
    `scan_model.clip_towers`): there, keys and values of every token, the rest for one."""
    width, layers, patch, size = (int(vision[k]) for k in ("width", "layers", "patch_size", "image_size"))
    patches = (size // patch) ** 2
    tokens = patches + 1
    block = tokens * 12 * width * width + 2 * tokens * tokens * width  # qkv, out, 4x MLP; scores and mix
    last = tokens * 2 * width * width + 10 * width * width + 2 * tokens * width
    return 2.0 * (patches * 3 * patch * patch * width + (layers - 1) * block + last)


def region_rates(entries: dict, vision: dict, rates: dict) -> dict:
    """Per backend: the region stage's GFLOP/s and its share of the int8 rate."""
    flops, int8 = tower_flops(vision), rates["gflop_per_s"]["int8"]
    out = {}
    for name, entry in entries.items():
        stage = entry.get("stages", {}).get("clip_adapter")
        regions = entry.get("valid_regions") or []
        if not stage or not regions:
            continue
        gflops = statistics.mean(regions) * flops / stage["mean"] / 1e9
        out[name] = {"gflop_per_s": round(gflops, 1), "share_of_int8_rate": round(gflops / int8, 3) if int8 else None}
    return {"tower_gflop_per_crop": round(flops / 1e9, 2), "backends": out}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--size", type=int, default=SIZE)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from benchmarks.machine import machine, versions

    result = {**gemm_rates(args.threads, args.size), "machine": machine(), "versions": versions()}
    report(result, args.json)
    return result


if __name__ == "__main__":
    main()

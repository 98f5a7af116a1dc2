"""int8 ONNX pieces for ONNX Runtime on CPU: dynamic quantisation of the matrix products.

`onnxruntime.quantization.quantize_dynamic` stores the weights of MatMuls with a constant
operand as int8 (per output channel) and quantises their activations to uint8 at run time
(`DynamicQuantizeLinear` + `MatMulInteger`): U8S8, the form ONNX Runtime recommends on CPUs
with AVX512-VNNI. Everything else (convolutions, attention products of two activations,
LayerNorm, softmax, the crop and threshold arithmetic) stays fp32, and inputs and outputs
keep their fp32 types. ONNX Runtime fuses each quantise + integer product + rescale into one
kernel at graph optimisation "extended" or "all" (the runtime's default); at "basic" vitb's
clip_adapter runs 16% slower (0.98 against 0.84 s per 8 regions).

The variant is for ONNX Runtime on CPU only; TensorRT engines are built from fp16 or fp32.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path

import onnx

# Which pieces get an int8 variant. Measured on the vitb preset (random weights, 640x640 drawn scene,
# ONNX Runtime CPU, 2 threads, AVX512-VNNI; benchmarks/int8_speed.py, results/int8_vitb_640x640.json),
# fp32 -> int8 per call, speed-up over three runs:
# - clip_adapter: 1.9 -> 0.93 s per 8 regions (1.9-2.1x), region_logits within 1.4e-2 of fp32. The
#   dominant cost: in the whole vitb pipeline (100 regions) 20.4 -> 10.1 s of 27 -> 15 s per image;
# - image_encoder: 4.5 -> 2.9 s (1.5-1.6x), outputs within 3.2e-2 of fp32;
# not:
# - mask_decoder: 0.46 -> 0.44 s (0.96-1.07x): no gain, and its masked attention is sensitive;
# - text_encoder: 1.7-1.9x, but it only runs for names missing from the caches, and int8 would move
#   the embeddings by 4.3e-2 relative from those cached in fp32.
INT8_PIECES = ("clip_adapter", "image_encoder")
# Weights per output channel, activations uint8 (U8S8), full 8-bit range. On vitb's clip_adapter
# (runs interleaved) per-tensor weights were 4% faster, within run-to-run noise, with 1.2x the error
# (1.6e-2), and reduce_range (7-bit weights, for CPUs without VNNI) no faster with 1.6x (2.1e-2).
# No node exclusions: none measurably helped. Keeping the LFM's DFT matrices in fp32 moved the
# image encoder's worst output (clip_context, official fixture model) only from 6.8e-2 to 6.5e-2.
PER_CHANNEL = True
REDUCE_RANGE = False
# In dynamic mode ONNX Runtime first rewrites Gemm (PyTorch's 2-D linear layers, e.g. the attention
# output projections) as MatMul, so both end up as MatMulInteger.
QUANTIZED_OPS = ("MatMul", "Gemm")


@contextlib.contextmanager
def _quiet_root_logger():
    """ONNX Runtime's quantiser calls `logging.warning` (a pre-processing hint) on every run, which
    would also install a root handler that prints every other library's warnings from then on."""
    root = logging.getLogger()
    level, placeholder = root.level, logging.NullHandler()
    root.setLevel(logging.ERROR)
    root.addHandler(placeholder)
    try:
        yield
    finally:
        root.removeHandler(placeholder)
        root.setLevel(level)


def quantize_piece(
    fp32_path: Path, out_path: Path, per_channel: bool = PER_CHANNEL, reduce_range: bool = REDUCE_RANGE,
    exclude: tuple[str, ...] = (), external_data: bool | None = None,
) -> list[Path]:
    """Write the int8 variant of the ONNX file `fp32_path` to `out_path`; returns the files written.

    `exclude` names nodes (of the fp32 graph) that stay fp32. `external_data` (default: as the
    source) writes the weights to `<out_path>.data`, as pieces over 1.8 GB need. The files
    are written in a temporary sibling folder and renamed into place, the ONNX file last.
    """
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = onnx.load(str(fp32_path), load_external_data=False)
    locations = sorted({entry.value for init in source.graph.initializer for entry in init.external_data
                        if init.data_location == onnx.TensorProto.EXTERNAL and entry.key == "location"})
    del source
    external_data = bool(locations) if external_data is None else external_data
    work = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent))
    try:
        # The quantiser writes a shape-inferred copy beside its input: it reads a copy of the source
        # in a folder of its own (onnx refuses symbolic and hard links to external data), so nothing
        # is written beside the source and no output can land on a source file.
        (work / ".source").mkdir()
        for name in (fp32_path.name, *locations):
            shutil.copyfile(fp32_path.parent / name, work / ".source" / name)
        staged = work / ".source" / fp32_path.name
        target = work / out_path.name
        with _quiet_root_logger():
            quantize_dynamic(
                staged, target, op_types_to_quantize=list(QUANTIZED_OPS), per_channel=per_channel,
                reduce_range=reduce_range, weight_type=QuantType.QInt8, nodes_to_exclude=list(exclude),
                use_external_data_format=external_data,
            )
        written = [out_path.with_name(out_path.name + ".data")] if external_data else []
        for path in [*written, out_path]:
            os.replace(work / path.name, path)
        return [out_path, *written]
    finally:
        shutil.rmtree(work, ignore_errors=True)

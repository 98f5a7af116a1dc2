"""int8 pieces by calibration: NNCF post-training quantisation into QDQ ONNX.

NNCF's transformer preset ("mixed": symmetric int8 weights per output channel, asymmetric
activations, SmoothQuant with alpha 0.95 on the matrix products) measures activation ranges on
calibration inputs (export/calibration.py: the pieces' own inputs, recorded while the fp32
bundle segments the calibration images) and writes QuantizeLinear/DequantizeLinear pairs into
an ordinary ONNX file. OpenVINO and ONNX Runtime both turn each pair and its product into an
int8 kernel, so one file serves both engines; nothing about it is engine-specific.

What is quantised is chosen per piece (QUANTISED_SCOPES): NNCF's default scope quantises every
matrix product, including arithmetic whose error changes *which* pixels and regions exist.
Measured on the `tiny` model trained 300 iterations on `scan data synth --images 48` (calibrated
on 8 train images, labels of the 12 val images against the fp32 runtime; docs/performance.md):
- clip_adapter, default scope: 53.5% identical labels (9.6% at the worst image). The mask
  resizes and crops ahead of the `> threshold` test are products too. Scope: the CLIP visual
  tower only (patch embedding and transformer blocks): 100% on ONNX Runtime and OpenVINO.
- image_encoder, default scope: 99.85% (ONNX Runtime) and 98.46% (OpenVINO, 93.7% at the worst
  image); without the deformable attention's offsets and weights 98.61% on OpenVINO; with the
  pixel decoder left in fp32 (Swin backbone and the original CLIP tower quantised) 99.89% on
  both (99.64% at the worst image). The pixel decoder in int8 is where the engines part.
- mask_decoder and text_encoder stay fp32 (OpenVINO runs them bf16 where the CPU is native):
  the masked attention flips whole blocks under small errors, and the text tower only runs for
  names missing from the caches.
"""

from __future__ import annotations

import ast
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx

INT8_PIECES = ("clip_adapter", "image_encoder")
# Module paths (prefixes of the exporter's `pkg.torch.onnx.name_scopes`) whose nodes NNCF may quantise.
QUANTISED_SCOPES = {
    "clip_adapter": ("model.clip.visual.",),
    "image_encoder": ("model.backbone.", "model.original_clip."),
}
PRESET = "mixed"
METHOD = "nncf post-training quantisation, transformer preset (mixed), SmoothQuant alpha 0.95 on MatMul"
# Pieces that also get a dynamically quantised file for ONNX Runtime, which runs it faster than
# the QDQ file: on vitb at 640 the image encoder took 1.42-1.58 s against 1.72-1.91 s (QDQ) and
# 2.15-2.35 s (fp32) in two runs; the CLIP adapter ran both forms at the same speed, so it keeps
# the QDQ file alone (benchmarks/int8_speed.py, docs/performance.md). OpenVINO runs the QDQ file.
DYNAMIC_PIECES = ("image_encoder",)
DYNAMIC_METHOD = ("onnxruntime dynamic quantisation: int8 weights per output channel, activations quantised at run "
                  "time per tensor, every MatMul and Gemm")
_SCOPE_KEY = "pkg.torch.onnx.name_scopes"


def node_scopes(node: onnx.NodeProto) -> list[str]:
    """The module paths the exporter recorded for `node` (outermost first); [] if none."""
    for prop in node.metadata_props:
        if prop.key == _SCOPE_KEY:
            try:
                return [str(s) for s in ast.literal_eval(prop.value)]
            except (ValueError, SyntaxError):
                return []
    return []


def ignored_nodes(model: onnx.ModelProto, scope: tuple[str, ...]) -> list[str]:
    """Names of the nodes outside `scope` (module-path prefixes): the ones NNCF must leave in fp32."""
    return [node.name for node in model.graph.node if not any(path.startswith(scope) for path in node_scopes(node))]


def quantize_piece(piece: str, fp32_path: Path, out_path: Path, feeds: list[dict[str, np.ndarray]],
                   external_data: bool = False, report: Callable[[str], None] | None = None) -> list[Path]:
    """Write the calibrated int8 variant of `piece` (its fp32 ONNX file `fp32_path`) to `out_path`.

    `feeds`: the piece's inputs, one dict per call, as the runtime sends them. `external_data`
    writes the weights to `<out_path>.data` (pieces over 1.8 GB). Written in a temporary sibling
    folder and renamed into place, the ONNX file last; returns the files written.
    """
    import nncf

    if piece not in QUANTISED_SCOPES:
        raise ValueError(f"{piece} has no int8 scope: choose one of {', '.join(QUANTISED_SCOPES)}")
    if not feeds:
        raise ValueError(f"no calibration inputs for {piece}")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    model = onnx.load(str(fp32_path))
    scope = nncf.IgnoredScope(names=ignored_nodes(model, QUANTISED_SCOPES[piece]), validate=False)
    with _quiet_nncf():
        quantised = nncf.quantize(
            model, nncf.Dataset(feeds), preset=nncf.QuantizationPreset.MIXED, model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(feeds), ignored_scope=scope,
        )
    del model

    def save(target: Path) -> None:
        if external_data:
            onnx.save(quantised, str(target), save_as_external_data=True, location=out_path.name + ".data")
        else:
            onnx.save(quantised, str(target))

    written = _write_in_place(out_path, external_data, save)
    if report is not None:
        report(f"{piece}: int8 calibrated on {len(feeds)} calls ({quantised_count(out_path)} quantised products)")
    return written


def quantize_dynamic_piece(piece: str, fp32_path: Path, out_path: Path, external_data: bool = False,
                           report: Callable[[str], None] | None = None) -> list[Path]:
    """Write the dynamically quantised variant of `piece` for ONNX Runtime (no calibration: its
    activation ranges are measured on each call). Atomic like `quantize_piece`."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out_path = Path(out_path)
    written = _write_in_place(out_path, external_data, lambda target: quantize_dynamic(
        Path(fp32_path), target, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
        weight_type=QuantType.QInt8, use_external_data_format=external_data))
    if report is not None:
        report(f"{piece}: int8 for ONNX Runtime, dynamic ({_integer_products(out_path)} integer products)")
    return written


def _write_in_place(out_path: Path, external_data: bool, save: Callable[[Path], None]) -> list[Path]:
    """`save(target)` in a temporary sibling folder, then the files renamed into place, the ONNX
    file last (its weights in `<out_path>.data` with `external_data`): the files written."""
    work = Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent))
    try:
        save(work / out_path.name)
        written = [out_path.with_name(out_path.name + ".data")] if external_data else []
        for path in [*written, out_path]:
            os.replace(work / path.name, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [out_path, *written]


def _integer_products(path: Path) -> int:
    proto = onnx.load(str(path), load_external_data=False)
    return sum(1 for node in proto.graph.node if node.op_type in ("MatMulInteger", "ConvInteger"))


def quantised_count(path: Path) -> int:
    """How many matrix products and convolutions of the ONNX file at `path` take dequantised weights."""
    proto = onnx.load(str(path), load_external_data=False)
    dequantised = {out for node in proto.graph.node if node.op_type == "DequantizeLinear" for out in node.output}
    return sum(1 for node in proto.graph.node
               if node.op_type in ("MatMul", "Gemm", "Conv") and any(i in dequantised for i in node.input[1:2]))


class _quiet_nncf:
    """NNCF logs every node it leaves alone at INFO and draws progress bars; keep its warnings only."""

    def __enter__(self):
        self.logger = logging.getLogger("nncf")
        self.level = self.logger.level
        self.logger.setLevel(logging.WARNING)
        return self

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
        return False

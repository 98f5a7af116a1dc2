"""fp16 ONNX pieces for TensorRT: fp16 islands in an fp32 graph, with explicit casts.

TensorRT 11 networks are strongly typed (no FP16 builder flag), so the precision lives in
the ONNX graph (EXPORT_NOTES §4.2). Rather than converting everything and casting some ops
back (which round-trips fp32 paths through fp16), this pass does the opposite: only nodes
inside the heavy modules of a piece (Swin, pixel decoder, decoder, CLIP transformers) and
of a type that is safe in fp16 (matrix products, convolutions, element-wise maths, layout
ops) become fp16. Everything else stays exactly as exported in fp32: LayerNorm, softmax,
reductions, GridSample, the LFM (DFT matrices), and the box, crop and threshold arithmetic
of the CLIP adapter, so the thresholded masks and crop taps are the fp32 ones. Inputs and
outputs of every piece stay fp32.
"""

from __future__ import annotations

import ast

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# Module scopes (as the dynamo exporter records them) whose nodes may become fp16.
FP16_SCOPES = {
    "image_encoder": ("model.backbone", "model.pixel_decoder", "model.original_clip"),
    # Not the mask head: its logits decide the masked-attention blocks (sigmoid < 0.5) and the
    # region masks (> threshold); fp16 rounding there flips decisions, not just values.
    "mask_decoder": tuple(f"model.mask_decoder.{m}" for m in (
        "transformer_self_attention_layers", "transformer_cross_attention_layers", "transformer_ffn_layers",
        "class_embed", "input_proj")) + ("model.calibration",),
    "clip_adapter": ("model.clip.visual",),
    "text_encoder": ("model.clip",),
}
# Scopes that stay fp32 although they lie inside an fp16 scope.
FP32_SCOPES = ("model.calibration.lfm",)
# Ops that compute the same thing in fp16 (with TensorRT's fp32 accumulation) or only move data.
FP16_OPS = frozenset({
    "MatMul", "Gemm", "Conv", "Add", "Sub", "Mul", "Div", "Neg", "Relu", "Erf", "Gelu", "Sigmoid", "Tanh",
    "Sqrt", "Reshape", "Transpose", "Slice", "Concat", "Split", "Squeeze", "Unsqueeze", "Gather", "GatherND",
    "GatherElements", "Expand", "Flatten", "Identity", "Where", "MaxPool", "Tile", "Pad",
})
FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)


def _scopes(node: onnx.NodeProto) -> list[str]:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            return [s for s in ast.literal_eval(prop.value) if s]
    return []


def _in_scope(scopes: list[str], prefixes: tuple[str, ...]) -> bool:
    return any(s == p or s.startswith(p + ".") for s in scopes for p in prefixes)


def fp16_nodes(proto: onnx.ModelProto, piece: str) -> set[int]:
    """Indices of the nodes that become fp16."""
    wanted = FP16_SCOPES[piece]
    return {
        i for i, node in enumerate(proto.graph.node)
        if node.op_type in FP16_OPS and node.domain in ("", "ai.onnx")
        and _in_scope(_scopes(node), wanted) and not _in_scope(_scopes(node), FP32_SCOPES)
    }


def _elem_types(proto: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {}
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        types[value.name] = value.type.tensor_type.elem_type
    for init in proto.graph.initializer:
        types[init.name] = init.data_type
    for node in proto.graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def _to_half(array: np.ndarray) -> np.ndarray:
    finite = np.isfinite(array)
    return np.where(finite, np.clip(array, -FP16_MAX, FP16_MAX), array).astype(np.float16)


def convert_to_fp16(proto: onnx.ModelProto, piece: str) -> onnx.ModelProto:
    """A new model in which the nodes of `fp16_nodes` compute in fp16; I/O stays fp32."""
    if proto.functions:
        raise ValueError(f"{piece}: graphs with local functions are not supported by the fp16 pass")
    graph = proto.graph
    types = _elem_types(proto)
    half_nodes = fp16_nodes(proto, piece)
    consumers: dict[str, list[int]] = {}
    for i, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(i)

    def wants_half(i: int, name: str) -> bool:
        return i in half_nodes and types.get(name) == FLOAT

    # Float initializers and constants that only fp16 nodes read are stored in fp16.
    new_type = dict(types)
    initializers = []
    for init in graph.initializer:
        users = consumers.get(init.name, [])
        if init.data_type == FLOAT and users and all(wants_half(i, init.name) for i in users):
            init = numpy_helper.from_array(_to_half(numpy_helper.to_array(init)), init.name)
            new_type[init.name] = HALF
        initializers.append(init)
    constant_nodes = {}
    for i, node in enumerate(graph.node):
        if node.op_type == "Constant" and types.get(node.output[0]) == FLOAT:
            users = consumers.get(node.output[0], [])
            if users and all(wants_half(j, node.output[0]) for j in users):
                value = _to_half(numpy_helper.to_array(node.attribute[0].t))
                constant_nodes[i] = helper.make_node("Constant", [], list(node.output), name=node.name,
                                                     value=numpy_helper.from_array(value))
                new_type[node.output[0]] = HALF
    for i in half_nodes:
        for name in graph.node[i].output:
            if types.get(name) == FLOAT:
                new_type[name] = HALF

    nodes, casts = [], {}

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            casts[key] = f"{name}__to_{'fp16' if to == HALF else 'fp32'}"
            nodes.append(helper.make_node("Cast", [name], [casts[key]], name=f"cast_{casts[key]}", to=to))
        return casts[key]

    outputs = {value.name for value in graph.output}
    renamed = {}
    for i, node in enumerate(graph.node):
        node = constant_nodes.get(i, node)
        new = onnx.NodeProto()
        new.CopyFrom(node)
        for k, name in enumerate(node.input):
            if not name or types.get(name) not in (FLOAT, HALF):
                continue
            want = HALF if wants_half(i, name) else types[name]
            source = renamed.get(name, name)
            if new_type.get(name) != want:
                new.input[k] = cast(source, want)
            else:
                new.input[k] = source
        for k, name in enumerate(node.output):
            if name in outputs and new_type.get(name) == HALF:  # graph outputs stay fp32
                renamed[name] = f"{name}__fp16"
                new.output[k] = renamed[name]
        nodes.append(new)
        for name in node.output:
            if name in renamed:
                nodes.append(helper.make_node("Cast", [renamed[name]], [name], name=f"cast_{name}_out", to=FLOAT))

    new_graph = helper.make_graph(nodes, graph.name, list(graph.input), list(graph.output), initializers)
    model = helper.make_model(new_graph, opset_imports=list(proto.opset_import), ir_version=proto.ir_version,
                              producer_name=proto.producer_name, producer_version=proto.producer_version)
    model.doc_string = proto.doc_string
    return onnx.shape_inference.infer_shapes(model)


def half_fraction(proto: onnx.ModelProto) -> float:
    """Share of the weight bytes stored in fp16 (a quick summary for the manifest)."""
    sizes = {HALF: 0, FLOAT: 0}
    for init in proto.graph.initializer:
        if init.data_type in sizes:
            sizes[init.data_type] += int(np.prod(init.dims)) * (2 if init.data_type == HALF else 4)
    total = sum(sizes.values())
    return sizes[HALF] / total if total else 0.0

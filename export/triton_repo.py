"""A Triton model repository from a bundle: `scan export --triton DIR` and `scan triton-repo`.

A stock Triton server (the NGC container) serves the repository without this project's CLI:

    DIR/scan/                 the orchestrator (Python backend, BLS): requests in, label maps out.
        config.pbtxt          inputs/outputs of `runtime.serve_requests`, dynamic batching, instances
        1/model.py            export/triton_models/orchestrator.py
        1/runtime/            a copy of this project's torch-free runtime (numpy, pillow)
        1/bundle/             the bundle's manifest, tokenizer and text caches (no graphs)
    DIR/scan_image_encoder/   one model per piece, called by the orchestrator:
    DIR/scan_mask_decoder/      onnxruntime: 1/model.onnx on Triton's ONNX Runtime backend
    DIR/scan_clip_adapter/      tensorrt:    1/model.plan on Triton's TensorRT backend
    DIR/scan_text_encoder/      openvino:    1/model.onnx on Triton's OpenVINO backend (CPU)
                                python:      1/model.onnx run inside the Python backend (Triton builds
                                             with only that backend) by ONNX Runtime or OpenVINO
                                             (`python_engine`; OpenVINO through the orchestrator's
                                             runtime copy: native-BF16 check, fallback, cache)

The orchestrator is the runtime's `Segmenter` with its pieces replaced by Triton calls, so the
repository computes what `scan segment --bundle` does, stage for stage. Configs are built as
Triton's own `ModelConfig` protobuf and written in its text format.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import runtime
from runtime.errors import BundleError, ScanError
from runtime.files import replace_folder, sha256_file, verify_files
from runtime.manifest import MANIFEST, Manifest, TensorSpec, read_manifest
from runtime.segmenter import PIECE_NAMES, PRECISIONS
from runtime.serve_requests import INPUTS, OUTPUTS, RequestLimits
from runtime.serving import MODEL_NAME
from runtime.vocab import parse_vocabulary

PIECE_BACKENDS = ("onnxruntime", "openvino", "tensorrt", "python")
PYTHON_ENGINES = ("onnxruntime", "openvino")
ORCHESTRATOR = MODEL_NAME  # clients call the orchestrator by the name `scan serve` gives its model
_TEMPLATES = Path(__file__).with_name("triton_models")
_RUNTIME = Path(runtime.__file__).parent
# What the orchestrator imports (the runtime's torch-free dependencies), for the server's Python.
ORCHESTRATOR_PACKAGES = ("numpy", "pillow", "ftfy", "regex", "filelock", "platformdirs")
_TYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
          "bool": "TYPE_BOOL", "uint8": "TYPE_UINT8"}


@dataclass
class RepositoryOptions:
    piece_backend: str = "onnxruntime"
    precision: str = "fp32"
    gpus: tuple[int, ...] = ()  # KIND_GPU instances of every piece on each of these devices; () = KIND_CPU
    instances: int = 1  # per GPU (or on the CPU) for each piece; the orchestrator's count
    max_batch_size: int = 4
    max_queue_delay_us: int = 2000
    vocab: str | None = None  # the orchestrator's default vocabulary
    resize: bool = True
    limits: RequestLimits = RequestLimits()
    threads: int = 0  # inference threads per piece instance (0: the engine's default)
    engines: str | None = None  # the bundle's engine folder for tensorrt pieces (default: the only match)
    python_engine: str = "onnxruntime"  # what runs the graphs of `python` pieces

    def validate(self) -> None:
        if self.piece_backend not in PIECE_BACKENDS:
            raise ScanError(f"Triton piece backend {self.piece_backend!r}: choose one of {', '.join(PIECE_BACKENDS)}")
        if self.python_engine not in PYTHON_ENGINES:
            raise ScanError(f"python piece engine {self.python_engine!r}: choose one of {', '.join(PYTHON_ENGINES)}")
        if self.precision not in PRECISIONS:
            raise ScanError(f"precision {self.precision!r}: choose one of {', '.join(PRECISIONS)}")
        if self.precision == "int8" and (self.piece_backend == "tensorrt" or self.gpus):
            raise ScanError("int8 pieces are for the CPU: drop --gpus, or use fp32/fp16")
        openvino = self.piece_backend == "openvino" or (self.piece_backend == "python" and self.python_engine == "openvino")
        if self.precision == "bf16" and not openvino:
            raise ScanError("bf16 pieces run on OpenVINO: use --backend openvino, or python with --python-engine openvino")
        if self.precision == "fp16" and openvino:
            raise ScanError("fp16 pieces are for GPUs: with OpenVINO use fp32, bf16 or int8")
        if self.piece_backend == "openvino" and self.gpus:
            raise ScanError("Triton's OpenVINO pieces run on the CPU here: drop --gpus (or use onnxruntime/tensorrt)")
        if self.instances < 1 or self.max_batch_size < 1 or self.max_queue_delay_us < 0 or self.threads < 0:
            raise ScanError("--instances and --max-batch-size must be at least 1, --max-queue-delay-us and --threads at least 0")
        if any(g < 0 for g in self.gpus):
            raise ScanError(f"--gpus {list(self.gpus)}: give device numbers 0, 1, ...")
        self.limits.validate()
        if self.vocab:
            parse_vocabulary(self.vocab)


def piece_model(piece: str) -> str:
    return f"{ORCHESTRATOR}_{piece}"


def write_repository(bundle: str | Path, out: str | Path, options: RepositoryOptions = RepositoryOptions(),
                     report=print) -> Path:
    """Write the repository for `bundle` at `out` (built beside it and renamed into place; `out` may be
    empty, new, or a repository this module wrote, see _check_destination)."""
    options.validate()
    bundle, out = Path(bundle), Path(out).resolve()
    manifest = read_manifest(bundle)
    manifest.check_variant(options.precision)
    missing = [p for p in PIECE_NAMES if p not in manifest.pieces]
    if missing:
        raise BundleError(f"bundle {bundle} lacks the piece(s) {', '.join(missing)}: export the whole model with `scan export`")
    sources = _piece_sources(bundle, manifest, options)
    files = [f for _, record, _ in sources.values() for f in (record.files() if hasattr(record, "files") else [record])]
    verify_files(bundle, [*files, manifest.tokenizer.bpe, *manifest.text_caches.values()])
    _check_destination(out)
    config_pb2, text_format = _protobuf()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for piece in PIECE_NAMES:
            _write_piece(tmp / piece_model(piece), sources[piece], bundle, options, config_pb2, text_format,
                         manifest.pieces[piece])
        _write_orchestrator(tmp / ORCHESTRATOR, bundle, manifest, options, config_pb2, text_format)
        replace_folder(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    backends = sorted({backend for backend, _, _ in sources.values()})
    placement = f"KIND_GPU x{options.instances} on GPU(s) {','.join(map(str, options.gpus))}" if options.gpus \
        else f"KIND_CPU x{options.instances}"
    report(f"triton: wrote {out}: orchestrator '{ORCHESTRATOR}' (Python backend, dynamic batches of up to "
           f"{options.max_batch_size}) and {len(PIECE_NAMES)} piece models on {'/'.join(backends)} ({options.precision}, "
           f"{placement})")
    return out


# -- pieces ----------------------------------------------------------------------------------------------


def _piece_sources(bundle: Path, manifest: Manifest, options: RepositoryOptions) -> dict:
    """Per piece: (Triton backend, the bundle file it serves, the graph's tensor specs)."""
    engine = options.python_engine if options.piece_backend == "python" else options.piece_backend
    onnx = {piece: manifest.pieces[piece].variant(options.precision, engine) for piece in PIECE_NAMES}
    if options.piece_backend != "tensorrt":
        return {piece: (options.piece_backend, onnx[piece], onnx[piece]) for piece in PIECE_NAMES}
    precision = "fp16" if options.precision == "fp16" else "fp32"
    folders = {key: folder for key, folder in manifest.engines.items()
               if folder.backend == "tensorrt" and folder.precision == precision}
    if options.engines:
        if options.engines not in folders:
            raise BundleError(f"bundle {bundle} has no {precision} TensorRT engine folder {options.engines!r} "
                              f"(it has: {', '.join(folders) or 'none'})")
        folders = {options.engines: folders[options.engines]}
    if len(folders) != 1:
        found = f"{len(folders)} ({', '.join(folders)})" if folders else "no"
        raise BundleError(
            f"bundle {bundle} has {found} {precision} TensorRT engine folders: a Triton server runs engines built on "
            "its GPU model with its own TensorRT version (`scan export --tensorrt` in that container), and with "
            "several, --engines names one; or serve the ONNX pieces on the onnxruntime backend")
    (folder,) = folders.values()
    sources = {}
    for piece in PIECE_NAMES:
        variants = [v for v in (manifest.pieces[piece], manifest.pieces[piece].fp16) if v is not None]
        graph = next((v for v in variants if v.file == folder.pieces[piece].onnx), onnx[piece])
        if any(not t.shape for t in graph.inputs):
            # Triton has no scalar inputs on models without a batch axis, and a plan's inputs are
            # fixed: this piece runs its one-element graph on ONNX Runtime's TensorRT accelerator.
            sources[piece] = ("onnxruntime", onnx[piece], onnx[piece])
        else:
            sources[piece] = ("tensorrt", folder.pieces[piece], graph)
    return sources


def _write_piece(folder: Path, source: tuple, bundle: Path, options: RepositoryOptions, config_pb2, text_format,
                 manifest_piece) -> None:
    backend, record, spec = source
    version = folder / "1"
    version.mkdir(parents=True)
    config = config_pb2.ModelConfig(name=folder.name, max_batch_size=0)
    if backend == "tensorrt":
        config.platform, config.backend, config.default_model_filename = "tensorrt_plan", "tensorrt", "model.plan"
        _link_or_copy(bundle / record.file, version / "model.plan")
    else:
        if any(not t.shape for t in spec.inputs):
            one_element_scalars(bundle / record.file, version / "model.onnx")
        else:
            _link_or_copy(bundle / record.file, version / "model.onnx")
        if record.external_data is not None:
            # The graph names its weights file; it must sit beside model.onnx under that name.
            _link_or_copy(bundle / record.external_data.file, version / Path(record.external_data.file).name)
    if backend == "onnxruntime":
        config.platform, config.backend, config.default_model_filename = "onnxruntime_onnx", "onnxruntime", "model.onnx"
        if options.threads:
            config.parameters["intra_op_thread_count"].string_value = str(options.threads)
        if options.piece_backend == "tensorrt" and options.gpus:
            accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            accelerator.parameters["precision_mode"] = "FP16" if options.precision == "fp16" else "FP32"
    elif backend == "openvino":
        # Triton's OpenVINO backend reads ONNX when told the file name; its CPU plugin, one stream.
        config.backend, config.default_model_filename = "openvino", "model.onnx"
        parameters = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1"}
        if options.threads:
            parameters["INFERENCE_NUM_THREADS"] = str(options.threads)
        if options.precision == "bf16":
            parameters["HINT_BF16"] = "YES"
        for key, value in parameters.items():
            config.parameters[key].string_value = value
    elif backend == "python":
        config.backend = "python"
        shutil.copyfile(_TEMPLATES / "onnx_piece.py", version / "model.py")
        config.parameters["threads"].string_value = str(options.threads)
        config.parameters["engine"].string_value = options.python_engine
        config.parameters["precision"].string_value = options.precision
        config.parameters["quantised"].string_value = str(record.precision == "int8").lower()
        check = manifest_piece.bf16_check()
        config.parameters["bf16_refused"].string_value = str(check is not None and not check.passed).lower()
        # The compiled-model cache key: the graph this folder serves (scalars may have been reshaped).
        config.parameters["sha256"].string_value = sha256_file(version / "model.onnx")
    for tensor in spec.inputs:
        _tensor(config.input.add(), tensor, config_pb2)
    for tensor in spec.outputs:
        _tensor(config.output.add(), tensor, config_pb2)
    _instances(config, options, config_pb2)
    (folder / "config.pbtxt").write_text(text_format.MessageToString(config))


def _tensor(entry, tensor: TensorSpec, config_pb2) -> None:
    entry.name = tensor.name
    entry.data_type = config_pb2.DataType.Value(_TYPES[tensor.dtype])
    entry.dims.extend([d if isinstance(d, int) else -1 for d in tensor.shape] or [1])  # scalars: see below


def one_element_scalars(source: Path, target: Path) -> None:
    """Save `source` with each rank-0 input taken as a one-element tensor and squeezed inside.

    Triton refuses scalar inputs on models without a batch axis (the pieces take whole tensors),
    so the clip adapter's `mask_threshold` travels as shape [1]; the added Squeeze gives the
    graph the scalar it was exported with. Weights stored beside the graph stay where they are.
    """
    import onnx

    model = onnx.load(str(source), load_external_data=False)
    graph = model.graph
    renamed = {}
    for value in graph.input:
        if len(value.type.tensor_type.shape.dim) == 0:
            renamed[value.name] = f"{value.name}__scalar"
            value.type.tensor_type.shape.dim.add().dim_value = 1
    _rename_uses(graph, renamed)
    squeezes = [onnx.helper.make_node("Squeeze", [outer], [inner], name=f"{inner}__squeeze") for outer, inner in renamed.items()]
    nodes = squeezes + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    onnx.checker.check_model(model)
    onnx.save(model, str(target))


def _rename_uses(graph, renamed: dict[str, str]) -> None:
    """Point every use of a renamed value (subgraphs of If/Loop included) at its new name."""
    for node in graph.node:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        for attribute in node.attribute:
            for subgraph in [attribute.g, *attribute.graphs] if attribute.HasField("g") else attribute.graphs:
                _rename_uses(subgraph, renamed)
    for output in graph.output:
        if output.name in renamed:
            raise BundleError(f"graph output {output.name} is also a scalar input: re-export the bundle")


def _instances(config, options: RepositoryOptions, config_pb2) -> None:
    group = config.instance_group.add(count=options.instances)
    if options.gpus:
        group.kind = config_pb2.ModelInstanceGroup.KIND_GPU
        group.gpus.extend(options.gpus)
    else:
        group.kind = config_pb2.ModelInstanceGroup.KIND_CPU


# -- the orchestrator ------------------------------------------------------------------------------------------


def _write_orchestrator(folder: Path, bundle: Path, manifest: Manifest, options: RepositoryOptions,
                        config_pb2, text_format) -> None:
    version = folder / "1"
    version.mkdir(parents=True)
    shutil.copyfile(_TEMPLATES / "orchestrator.py", version / "model.py")
    shutil.copytree(_RUNTIME, version / "runtime", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    data = version / "bundle"
    for record in [manifest.tokenizer.bpe, *manifest.text_caches.values()]:
        (data / record.file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle / record.file, data / record.file)
    shutil.copyfile(bundle / MANIFEST, data / MANIFEST)
    packages = [*ORCHESTRATOR_PACKAGES, *([options.python_engine] if options.piece_backend == "python" else [])]
    (folder / "requirements.txt").write_text("".join(f"{name}\n" for name in packages))
    config = config_pb2.ModelConfig(name=ORCHESTRATOR, backend="python", max_batch_size=options.max_batch_size)
    config.dynamic_batching.max_queue_delay_microseconds = options.max_queue_delay_us
    def data_type(dtype) -> int:
        return config_pb2.DataType.Value("TYPE_STRING" if dtype is np.object_ else _TYPES[np.dtype(dtype).name])

    for name, dtype, shape, optional in INPUTS:
        config.input.add(name=name, optional=optional, dims=list(shape), data_type=data_type(dtype))
    for name, dtype, shape in OUTPUTS:
        config.output.add(name=name, dims=list(shape), data_type=data_type(dtype))
    # The orchestrator's own work (resize, normalisation, thresholds, argmax) is numpy on the CPU.
    config.instance_group.add(count=options.instances, kind=config_pb2.ModelInstanceGroup.KIND_CPU)
    parameters = {
        "precision": options.precision, "resize": str(options.resize).lower(), "vocab": options.vocab or "",
        "max_classes": str(options.limits.max_classes), "max_image_pixels": str(options.limits.max_image_pixels),
        **{f"{piece}_model": piece_model(piece) for piece in PIECE_NAMES},
    }
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    (folder / "config.pbtxt").write_text(text_format.MessageToString(config))


# -- files -------------------------------------------------------------------------------------------------


def _protobuf():
    try:
        from google.protobuf import text_format
        from tritonclient.grpc import model_config_pb2
    except ImportError:
        raise ScanError("writing a Triton model repository needs tritonclient: pip install 'scan-deploy[serve]'") from None
    return model_config_pb2, text_format


def _check_destination(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise ScanError(f"{out} exists and is not a folder")
        if any(out.iterdir()) and not (out / ORCHESTRATOR / "1" / "runtime").is_dir():
            raise ScanError(f"{out} is a non-empty folder that is not a repository `scan export --triton` wrote: "
                            "choose an empty or new path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ScanError(f"cannot create {out.parent}: {exc.strerror}") from None
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise ScanError(f"cannot write into {out.parent}: permission denied")


def _link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the file system allows (graphs can be gigabytes), a copy otherwise."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)



"""`scan triton-repo`: a Triton model repository from the session bundle.

The repository with Python-backend pieces (OpenVINO inside) is loaded by the same Triton server
binary `scan serve` runs (PyTriton's, which has only the Python backend) and answers like a local
`Segmenter` on OpenVINO. The ONNX Runtime, OpenVINO and TensorRT variants cannot load here: their
configs are parsed with Triton's own protobuf and checked against the graphs they serve.
"""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import onnx
import pytest
from PIL import Image
from typer.testing import CliRunner

from conftest import scan_server

tritonclient_http = pytest.importorskip("tritonclient.http", reason="pip install 'scan-deploy[serve]'")
pytest.importorskip("pytriton", reason="pip install 'scan-deploy[serve]'")

from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from cli import app  # noqa: E402
from export.triton_repo import ORCHESTRATOR, RepositoryOptions, one_element_scalars, piece_model, write_repository  # noqa: E402
from runtime.files import sha256_file  # noqa: E402
from runtime.manifest import EngineFolder, EnginePlan, read_manifest, write_manifest  # noqa: E402
from runtime.segmenter import PIECE_NAMES, Segmenter  # noqa: E402
from runtime.synthetic import synthetic_scene  # noqa: E402

VOCAB = ["sky", "wall", "grass", "water", "road", "ball", "box", "tree", "house", "flower"]
ONNX_TYPES = {onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16",
              onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.BOOL: "TYPE_BOOL"}


def _config(folder) -> model_config_pb2.ModelConfig:
    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def _check_against_graph(config, graph_path) -> None:
    """Triton's ONNX Runtime backend refuses a config whose tensors differ from the graph's."""
    graph = onnx.load(str(graph_path), load_external_data=False).graph
    for declared, values in ((config.input, graph.input), (config.output, graph.output)):
        assert [t.name for t in declared] == [v.name for v in values]
        for tensor, value in zip(declared, values):
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
            assert list(tensor.dims) == dims, tensor.name
            assert model_config_pb2.DataType.Name(tensor.data_type) == ONNX_TYPES[value.type.tensor_type.elem_type]


@pytest.fixture(scope="module")
def repository(tiny_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("triton") / "repository"
    # Through the command, as a user writes one; images at their own size keep the test short.
    result = CliRunner().invoke(app, ["triton-repo", "--bundle", str(tiny_bundle.path), "--out", str(out),
                                      "--backend", "python", "--python-engine", "openvino", "--precision", "fp32",
                                      "--vocab", ",".join(VOCAB), "--threads", "1",
                                      "--no-resize", "--max-batch-size", "4", "--max-queue-delay-us", "200000"])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory):
    with scan_server(["--repository", str(repository)], tmp_path_factory.mktemp("triton_server")) as started:
        yield started


def _inputs(image=None, names=None, encoded=None):
    inputs = []
    if image is not None:
        inputs.append(tritonclient_http.InferInput("image", [1, *image.shape], "UINT8"))
        inputs[-1].set_data_from_numpy(image[None])
    if encoded is not None:
        inputs.append(tritonclient_http.InferInput("image_bytes", [1, 1], "BYTES"))
        inputs[-1].set_data_from_numpy(np.array([[encoded]], dtype=np.object_))
    if names is not None:
        raw = np.array([[n.encode("utf-8") for n in names]], dtype=np.object_)
        inputs.append(tritonclient_http.InferInput("classes", list(raw.shape), "BYTES"))
        inputs[-1].set_data_from_numpy(raw)
    return inputs


def test_the_repository_loads_in_triton_and_answers_like_a_local_segmenter(server, tiny_bundle):
    client = server["client"]
    for model in (ORCHESTRATOR, *map(piece_model, PIECE_NAMES)):
        assert client.is_model_ready(model), model
    images = [synthetic_scene(96, 128, seed=s) for s in range(3)]
    # The pieces run OpenVINO f32 with one thread each: so does the local segmenter.
    local = Segmenter(tiny_bundle.path, backend="openvino", precision="fp32", threads=1, resize=False)
    local.set_vocabulary(VOCAB)
    expected = [local.segment(image) for image in images]
    pending = [client.async_infer(ORCHESTRATOR, _inputs(image)) for image in images]
    for request, want in zip(pending, expected):
        answer = request.get_result()
        assert answer.as_numpy("error")[0][0] == b""
        assert [c.decode() for c in answer.as_numpy("classes")[0]] == VOCAB
        np.testing.assert_array_equal(answer.as_numpy("labels")[0], want.label_map)
        np.testing.assert_array_equal(answer.as_numpy("scores")[0], want.label_scores)
    # The orchestrator's work went through the piece models (BLS), one call per image at least.
    stats = client.get_inference_statistics(piece_model("image_encoder"))["model_stats"][0]
    assert int(stats["inference_count"]) >= len(images)
    # An encoded PNG with its own vocabulary.
    buffer = io.BytesIO()
    Image.fromarray(images[0]).save(buffer, format="PNG")
    answer = client.infer(ORCHESTRATOR, _inputs(encoded=buffer.getvalue(), names=["sky", "grass"]))
    local.set_vocabulary(["sky", "grass"])
    np.testing.assert_array_equal(answer.as_numpy("labels")[0], local.segment(images[0]).label_map)
    # A bad request is answered with its error and the next one is served.
    refused = client.infer(ORCHESTRATOR, _inputs(encoded=b"not an image"))
    assert b"cannot decode the image bytes" in refused.as_numpy("error")[0][0]
    assert client.infer(ORCHESTRATOR, _inputs(images[1])).as_numpy("error")[0][0] == b""


def test_the_repository_stops_on_sigterm(server):
    server["client"].close()  # Triton waits for open connections before it stops
    server["process"].terminate()
    assert server["process"].wait(timeout=120) == 0, server["log"].read_text()[-3000:]
    assert "serve: stopped" in server["log"].read_text()


def test_onnxruntime_repository_matches_its_graphs_with_gpu_instance_groups(tiny_bundle, tmp_path):
    out = write_repository(tiny_bundle.path, tmp_path / "ort", RepositoryOptions(
        piece_backend="onnxruntime", precision="fp16", gpus=(0, 1), instances=2, max_batch_size=8), report=print)
    for piece in PIECE_NAMES:
        folder = out / piece_model(piece)
        config = _config(folder)
        assert (config.platform, config.backend, config.max_batch_size) == ("onnxruntime_onnx", "onnxruntime", 0)
        _check_against_graph(config, folder / "1" / "model.onnx")
        (group,) = config.instance_group
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_GPU and list(group.gpus) == [0, 1] and group.count == 2
        assert not config.optimization.execution_accelerators.gpu_execution_accelerator
    orchestrator = _config(out / ORCHESTRATOR)
    assert orchestrator.backend == "python" and orchestrator.max_batch_size == 8
    assert orchestrator.dynamic_batching.max_queue_delay_microseconds == 2000
    assert all(t.optional for t in orchestrator.input) and [t.name for t in orchestrator.output] == ["labels", "scores", "classes", "error"]
    assert orchestrator.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_CPU
    assert orchestrator.parameters["precision"].string_value == "fp16"
    # The orchestrator carries the runtime, the bundle's data (no graphs) and its package list.
    version = out / ORCHESTRATOR / "1"
    assert (version / "runtime" / "segmenter.py").is_file() and (version / "runtime" / "data" / "vocabularies.json").is_file()
    assert read_manifest(version / "bundle").text_caches and not list((version / "bundle").glob("*.onnx"))
    assert "pillow" in (out / ORCHESTRATOR / "requirements.txt").read_text()
    # Writing again over it replaces it whole, leaving nothing beside it.
    write_repository(tiny_bundle.path, out, RepositoryOptions(max_batch_size=2), report=print)
    assert _config(out / ORCHESTRATOR).max_batch_size == 2 and not _config(out / piece_model("mask_decoder")).instance_group[0].gpus
    assert [p.name for p in tmp_path.iterdir()] == ["ort"]


def test_openvino_repository_matches_its_graphs_and_asks_for_bf16(tiny_bundle, tmp_path):
    out = write_repository(tiny_bundle.path, tmp_path / "ov", RepositoryOptions(
        piece_backend="openvino", precision="bf16", threads=2, instances=2), report=print)
    for piece in PIECE_NAMES:
        folder = out / piece_model(piece)
        config = _config(folder)
        assert (config.backend, config.default_model_filename, config.max_batch_size) == ("openvino", "model.onnx", 0)
        parameters = {key: value.string_value for key, value in config.parameters.items()}
        assert parameters == {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": "2",
                              "HINT_BF16": "YES"}
        _check_against_graph(config, folder / "1" / "model.onnx")
        (group,) = config.instance_group
        assert group.kind == model_config_pb2.ModelInstanceGroup.KIND_CPU and group.count == 2
    # bf16 compiles the fp32 graphs: the files served are the bundle's fp32 pieces.
    assert sha256_file(out / piece_model("text_encoder") / "1" / "model.onnx") == tiny_bundle.manifest.pieces["text_encoder"].sha256
    assert _config(out / ORCHESTRATOR).parameters["precision"].string_value == "bf16"
    python = write_repository(tiny_bundle.path, tmp_path / "py", RepositoryOptions(
        piece_backend="python", python_engine="openvino", precision="bf16"), report=print)
    config = _config(python / piece_model("clip_adapter"))
    assert config.parameters["engine"].string_value == "openvino" and config.parameters["precision"].string_value == "bf16"
    # The cache key is the graph served: the clip adapter's scalar threshold was reshaped.
    served = python / piece_model("clip_adapter") / "1" / "model.onnx"
    assert config.parameters["sha256"].string_value == sha256_file(served) != tiny_bundle.manifest.pieces["clip_adapter"].sha256
    assert "openvino" in (python / ORCHESTRATOR / "requirements.txt").read_text().split()


def test_the_scalar_threshold_travels_as_one_element_with_identical_outputs(tiny_bundle, tmp_path):
    import onnxruntime as ort

    source = tiny_bundle.path / tiny_bundle.manifest.pieces["clip_adapter"].file
    one_element_scalars(source, tmp_path / "clip_adapter.onnx")
    rng = np.random.default_rng(0)
    feeds = {}
    for value in onnx.load(str(source)).graph.input:
        shape = [d.dim_value or 4 for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type == onnx.TensorProto.INT64:
            high = 197 if value.name == "shift_keys" else 3
            feeds[value.name] = rng.integers(0, high, size=shape).astype(np.int64)
        else:
            feeds[value.name] = rng.random(shape, dtype=np.float32)
    feeds["image"] = rng.random((3, 64, 96), dtype=np.float32)
    feeds["mask_probs"] = rng.random((4, 64, 96), dtype=np.float32)
    feeds["mask_threshold"] = np.asarray(0.4, np.float32)
    original = ort.InferenceSession(str(source)).run(None, feeds)
    wrapped = ort.InferenceSession(str(tmp_path / "clip_adapter.onnx")).run(None, {**feeds, "mask_threshold": np.asarray([0.4], np.float32)})
    for a, b in zip(original, wrapped):
        np.testing.assert_array_equal(a, b)


def test_tensorrt_repository_serves_the_bundles_plans(tiny_bundle, tmp_path):
    # No TensorRT here: a copy of the bundle lists placeholder plan files (not engines) as a
    # TensorRT folder, which is all the repository writer reads of them.
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, bundle, copy_function=os.link)
    manifest = read_manifest(bundle)
    (bundle / "engines" / "placeholder").mkdir(parents=True)
    plans = {}
    for piece in PIECE_NAMES:
        path = bundle / "engines" / "placeholder" / f"{piece}.plan"
        path.write_bytes(f"placeholder {piece}".encode())
        plans[piece] = EnginePlan(f"engines/placeholder/{piece}.plan", sha256_file(path), path.stat().st_size,
                                  onnx=manifest.pieces[piece].file)
    manifest.engines = {"placeholder": EngineFolder("tensorrt", "10.x", "placeholder GPU", "fp32", {}, None, plans)}
    write_manifest(bundle, manifest)
    out = write_repository(bundle, tmp_path / "trt", RepositoryOptions(piece_backend="tensorrt", gpus=(0,)), report=print)
    for piece in PIECE_NAMES:
        folder = out / piece_model(piece)
        config = _config(folder)
        if piece == "clip_adapter":  # a scalar input: its one-element graph on ONNX Runtime's TensorRT accelerator
            assert config.backend == "onnxruntime"
            (accelerator,) = config.optimization.execution_accelerators.gpu_execution_accelerator
            assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP32"
            _check_against_graph(config, folder / "1" / "model.onnx")
        else:
            assert (config.platform, config.backend) == ("tensorrt_plan", "tensorrt")
            assert (folder / "1" / "model.plan").read_bytes() == f"placeholder {piece}".encode()
            inputs = [(t.name, list(t.dims)) for t in config.input]
            assert inputs == [(t.name, [d if isinstance(d, int) else -1 for d in t.shape])
                              for t in manifest.pieces[piece].inputs]


def test_bad_repository_requests_name_the_problem_and_write_nothing(tiny_bundle, tmp_path):
    runner = CliRunner()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    cases = [
        (["--out", str(taken)], "is a non-empty folder that is not a repository"),
        (["--out", str(tmp_path / "a"), "--backend", "tensorrt"], "no fp32 TensorRT engine folders"),
        (["--out", str(tmp_path / "b"), "--backend", "triton"], "choose one of onnxruntime, openvino, tensorrt, python"),
        (["--out", str(tmp_path / "c"), "--precision", "int8", "--gpus", "0"], "int8 pieces are for the CPU"),
        (["--out", str(tmp_path / "f"), "--precision", "bf16"], "bf16 pieces run on OpenVINO"),
        (["--out", str(tmp_path / "g"), "--backend", "openvino", "--gpus", "0"], "OpenVINO pieces run on the CPU"),
        (["--out", str(tmp_path / "h"), "--backend", "python", "--python-engine", "tvm"], "choose one of onnxruntime, openvino"),
        (["--out", str(tmp_path / "d"), "--gpus", "0,0"], "give distinct device numbers"),
        (["--out", str(tmp_path / "e"), "--vocab", "a,a"], "duplicate"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["triton-repo", "--bundle", str(tiny_bundle.path), *extra])
        assert result.exit_code == 2 and message in result.stderr, (extra, result.output)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"] and (taken / "notes.txt").read_text() == "mine"
    result = runner.invoke(app, ["serve", "--repository", str(taken)])
    assert result.exit_code == 2 and "is not a model repository `scan export --triton` wrote" in result.stderr
    result = runner.invoke(app, ["serve"])
    assert result.exit_code == 2 and "pass either --bundle (serve a bundle) or --repository" in result.stderr
    # scan export --triton checks its repository options before minutes of export.
    result = runner.invoke(app, ["export", "--preset", "tiny", "--out", str(tmp_path / "bundle"),
                                 "--triton", str(tmp_path / "repo"), "--triton-backend", "nope"])
    assert result.exit_code == 2 and "Triton piece backend 'nope'" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]

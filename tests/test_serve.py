"""`scan serve`: a real Triton Inference Server (PyTriton's) on localhost with the session bundle.

Concurrent requests get the label maps of a local `Segmenter`, Triton forms dynamic batches,
bad requests get an error the client can read while the server keeps serving, SIGTERM stops it.
"""

from __future__ import annotations

import io
import os
import signal
import urllib.request

import numpy as np
import pytest
from PIL import Image

from conftest import scan_server

tritonclient_http = pytest.importorskip("tritonclient.http", reason="pip install 'scan-deploy[serve]'")
pytest.importorskip("pytriton", reason="pip install 'scan-deploy[serve]'")

from runtime.segmenter import Segmenter  # noqa: E402
from runtime.serving import MODEL_NAME, backend_environment, hosting_problem  # noqa: E402
from runtime.synthetic import synthetic_scene  # noqa: E402

VOCAB = ["sky", "wall", "grass", "water", "road", "ball", "box", "tree", "house", "flower"]


@pytest.fixture(scope="module")
def server(tiny_bundle, tmp_path_factory):
    arguments = ["--bundle", str(tiny_bundle.path), "--backend", "openvino", "--precision", "fp32", "--vocab", ",".join(VOCAB), "--instances", "1", "--max-batch-size", "4",
                 "--max-queue-delay-us", "200000", "--threads", "2",
                 "--no-resize"]  # images at their own size keep the test short (the resize has its own tests)
    with scan_server(arguments, tmp_path_factory.mktemp("serve"), concurrency=8) as started:
        yield started


def _inputs(image: np.ndarray, names: list[str] | None = None):
    inputs = [tritonclient_http.InferInput("image", [1, *image.shape], "UINT8")]
    inputs[0].set_data_from_numpy(image[None])
    if names is not None:
        raw = np.array([[n.encode("utf-8") for n in names]], dtype=np.object_)
        inputs.append(tritonclient_http.InferInput("classes", list(raw.shape), "BYTES"))
        inputs[-1].set_data_from_numpy(raw)
    return inputs


def _answer(result):
    return result.as_numpy("labels")[0], [c.decode() for c in result.as_numpy("classes")[0]]


def _request(client, image: np.ndarray, names: list[str] | None = None):
    return _answer(client.infer(MODEL_NAME, _inputs(image, names)))


def test_concurrent_requests_are_batched_and_equal_local_segmentation(server, tiny_bundle):
    client = server["client"]
    images = [synthetic_scene(96, 128, seed=s) for s in range(4)]
    local = Segmenter(tiny_bundle.path, backend="openvino", precision="fp32", threads=2, resize=False)  # as served
    local.set_vocabulary(VOCAB)
    expected = [local.segment(image).label_map for image in images]
    # The HTTP client's own concurrency (its requests are in flight together; it is not thread-safe).
    pending = [client.async_infer(MODEL_NAME, _inputs(image)) for image in images]
    answers = [_answer(request.get_result()) for request in pending]
    for (labels, classes), want in zip(answers, expected):
        assert classes == VOCAB and labels.dtype == np.int32
        np.testing.assert_array_equal(labels, want)
    # Each pixel's label score, when asked for (Triton returns only the requested outputs).
    scored = client.infer(MODEL_NAME, _inputs(images[1]), outputs=[tritonclient_http.InferRequestedOutput("scores")])
    assert scored.as_numpy("labels") is None
    np.testing.assert_array_equal(scored.as_numpy("scores")[0], local.segment(images[1]).label_scores)
    stats = client.get_inference_statistics(MODEL_NAME)["model_stats"][0]
    sizes = {int(entry["batch_size"]) for entry in stats["batch_stats"]}
    assert max(sizes) > 1, f"Triton formed no batch larger than 1: {stats['batch_stats']}"
    # Health, readiness and Prometheus metrics are Triton's own endpoints.
    for path in ("/v2/health/live", "/v2/health/ready", f"/v2/models/{MODEL_NAME}/ready"):
        with urllib.request.urlopen(f"http://localhost:{server['http']}{path}", timeout=10) as answer:
            assert answer.status == 200, path
    with urllib.request.urlopen(f"http://localhost:{server['metrics']}/metrics", timeout=10) as answer:
        metrics = answer.read().decode()
    (success,) = [line for line in metrics.splitlines() if line.startswith("nv_inference_request_success{") and f'model="{MODEL_NAME}"' in line]
    assert float(success.rsplit(" ", 1)[1]) >= len(images)
    # A request with its own vocabulary gets labels over those names.
    labels, classes = _request(client, images[0], ["sky", "grass"])
    local.set_vocabulary(["sky", "grass"])
    assert classes == ["sky", "grass"]
    np.testing.assert_array_equal(labels, local.segment(images[0]).label_map)


def test_bad_requests_get_readable_errors_and_the_server_keeps_serving(server):
    client = server["client"]
    image = synthetic_scene(64, 64, seed=1)
    # Refused by Triton against the model's config, naming the input.
    wrong_dtype = tritonclient_http.InferInput("image", [1, 64, 64, 3], "FP32")
    wrong_dtype.set_data_from_numpy(image[None].astype(np.float32))
    with pytest.raises(tritonclient_http.InferenceServerException) as error:
        client.infer(MODEL_NAME, [wrong_dtype])
    assert "'image'" in str(error.value) and "FP32" in str(error.value) and "UINT8" in str(error.value)
    wrong_rank = tritonclient_http.InferInput("image", [1, 64, 64], "UINT8")
    wrong_rank.set_data_from_numpy(image[None, ..., 0])
    with pytest.raises(tritonclient_http.InferenceServerException, match="unexpected shape for input 'image'"):
        client.infer(MODEL_NAME, [wrong_rank])
    with pytest.raises(tritonclient_http.InferenceServerException):  # zero-size: refused in PyTriton's transfer
        _request(client, np.zeros((0, 0, 3), np.uint8))
    # Refused by the model, in the request's own `error` output: a bad request batched with good
    # ones must not fail them, so these come back as answers, not as failed requests.
    bad_utf8 = _inputs(image, ["sky"])
    bad_utf8[1].set_data_from_numpy(np.array([[b"\xff\xfe"]], dtype=np.object_))
    good = _inputs(image, ["sky"])
    pending = [client.async_infer(MODEL_NAME, bad_utf8), client.async_infer(MODEL_NAME, good)]
    refused, answered = [request.get_result() for request in pending]
    assert b"not valid UTF-8" in refused.as_numpy("error")[0][0]
    assert answered.as_numpy("error")[0][0] == b"" and answered.as_numpy("labels").shape == (1, 64, 64)
    many = client.infer(MODEL_NAME, _inputs(image, [f"class {i}" for i in range(5000)]))
    assert b"5000 class names, more than this server's 1024" in many.as_numpy("error")[0][0]
    empty = _inputs(image, ["x"])
    empty[1] = tritonclient_http.InferInput("classes", [1, 0], "BYTES")
    empty[1].set_data_from_numpy(np.zeros((1, 0), dtype=np.object_))
    with pytest.raises(tritonclient_http.InferenceServerException):  # zero-size: refused in PyTriton's transfer
        client.infer(MODEL_NAME, empty)
    labels, _ = _request(client, np.full((1, 1, 3), 200, np.uint8))
    assert labels.shape == (1, 1)
    huge = client.infer(MODEL_NAME, _inputs(np.zeros((10000, 10000, 3), np.uint8)))  # 300 MB on the wire
    assert b"image of 10000x10000 pixels: this server takes at most 40000000" in huge.as_numpy("error")[0][0]
    # An image as an encoded file: a PNG is segmented, anything else refused; a request without an image too.
    encoded = tritonclient_http.InferInput("image_bytes", [1, 1], "BYTES")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    encoded.set_data_from_numpy(np.array([[buffer.getvalue()]], dtype=np.object_))
    from_file = client.infer(MODEL_NAME, [encoded])
    np.testing.assert_array_equal(from_file.as_numpy("labels")[0], _request(client, image)[0])
    encoded.set_data_from_numpy(np.array([[b"GIF89a..."]], dtype=np.object_))
    assert b"cannot decode the image bytes" in client.infer(MODEL_NAME, [encoded]).as_numpy("error")[0][0]
    no_image = _inputs(image, ["sky"])[1:]
    assert b"send the image either as 'image'" in client.infer(MODEL_NAME, no_image).as_numpy("error")[0][0]
    labels, _ = _request(client, image)
    assert labels.shape == (64, 64)


def test_a_request_cancelled_mid_flight_leaves_the_server_serving(server):
    import tritonclient.grpc as grpc_client

    client = grpc_client.InferenceServerClient(f"localhost:{server['grpc']}")
    image = synthetic_scene(480, 640, seed=2)
    inputs = [grpc_client.InferInput("image", [1, *image.shape], "UINT8")]
    inputs[0].set_data_from_numpy(image[None])
    with pytest.raises(grpc_client.InferenceServerException, match="(?i)deadline"):
        client.infer(MODEL_NAME, inputs, client_timeout=0.05)
    answer = client.infer(MODEL_NAME, inputs)
    assert answer.as_numpy("labels").shape == (1, 480, 640) and answer.as_numpy("error")[0][0] == b""


def test_scan_segment_through_the_server_writes_the_local_outputs(server, tiny_bundle, tmp_path):
    from PIL import Image
    from typer.testing import CliRunner

    from cli import app

    image = tmp_path / "scene.png"
    Image.fromarray(synthetic_scene(96, 128, seed=4)).save(image)
    runner, vocab = CliRunner(), ",".join(VOCAB)
    outputs = {}
    for name, source in (("local", ["--bundle", str(tiny_bundle.path), "--backend", "openvino", "--precision", "fp32", "--threads", "2",
                                    "--no-resize"]),
                         ("http", ["--server", f"localhost:{server['http']}"]),
                         ("grpc", ["--server", f"grpc://localhost:{server['grpc']}"])):
        result = runner.invoke(app, ["segment", str(image), "--vocab", vocab, "--out", str(tmp_path / name), *source])
        assert result.exit_code == 0, result.output
        outputs[name] = [(tmp_path / name / f"scene{suffix}").read_bytes() for suffix in (".png", "_overlay.png")]
    assert outputs["http"] == outputs["local"] == outputs["grpc"]
    result = runner.invoke(app, ["segment", str(image), "--vocab", vocab, "--out", str(tmp_path / "x"),
                                 "--server", "localhost:1"])
    assert result.exit_code == 2 and "no Triton server answers at localhost:1" in result.stderr


def test_sigterm_stops_the_server(server):
    process = server["process"]
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 0, server["log"].read_text()[-3000:]
    assert "serve: stopped" in server["log"].read_text()


def test_the_backend_finds_this_interpreters_libpython():
    from cli_jobs.doctor import serve_report

    line = serve_report()
    assert "nvidia-pytriton" in line and ("will load" in line) == (hosting_problem() is None)
    env = backend_environment({"LD_LIBRARY_PATH": "/elsewhere"})
    if hosting_problem() is None:
        first = env["LD_LIBRARY_PATH"].split(os.pathsep)[0]
        assert any(name.startswith("libpython") for name in os.listdir(first))
        assert env["LD_LIBRARY_PATH"].endswith("/elsewhere")
    else:
        assert env["LD_LIBRARY_PATH"] == "/elsewhere"

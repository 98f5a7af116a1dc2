"""Shared test helpers: the official fixtures and tensor comparisons.

The official fixtures live beside the checkout (``../shared/fixtures``); CI has them
there too. They are read in place, never copied into the project. Tests that need them
skip with a clear message when the folder is absent.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FIXTURES_ROOT = Path(os.environ.get("SCAN_FIXTURES", PROJECT_ROOT.parent / "shared" / "fixtures"))
OFFICIAL_DEV = FIXTURES_ROOT / "official_dev"

# Tolerance of the issue: max abs difference over max abs reference.
REL_TOL = 1e-4


def rel_diff(ours, ref) -> float:
    """Max absolute difference divided by the max absolute reference value."""
    import torch

    ours = torch.as_tensor(ours).double()
    ref = torch.as_tensor(ref).double()
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    scale = ref.abs().max().clamp_min(1e-30)
    return float((ours - ref).abs().max() / scale)


@dataclass
class OfficialCase:
    """One case produced by the official implementation (see its README)."""

    root: Path
    expected: dict
    state_dict: dict
    classes: list[str]

    def sub_state_dict(self, prefix: str) -> dict:
        """The official state dict entries under ``prefix``, with the prefix removed."""
        return {k[len(prefix):]: v for k, v in self.state_dict.items() if k.startswith(prefix)}


def _require_fixtures() -> None:
    if not OFFICIAL_DEV.is_dir():
        pytest.skip(
            f"official fixtures not found at {OFFICIAL_DEV} "
            "(they sit beside the checkout in ../shared/fixtures; set SCAN_FIXTURES to point elsewhere)"
        )


@pytest.fixture(scope="session")
def official_dev() -> OfficialCase:
    _require_fixtures()
    import torch

    expected = torch.load(OFFICIAL_DEV / "expected.pt", map_location="cpu", weights_only=True)
    state_dict = torch.load(OFFICIAL_DEV / "model.pth", map_location="cpu", weights_only=True)["model"]
    classes = json.loads((OFFICIAL_DEV / "classes.json").read_text())
    return OfficialCase(OFFICIAL_DEV, expected, state_dict, classes)


@pytest.fixture(scope="session")
def fixtures_root() -> Path:
    if not FIXTURES_ROOT.is_dir():
        pytest.skip(f"fixtures not found at {FIXTURES_ROOT}")
    return FIXTURES_ROOT


# -- one exported `tiny` bundle per test session ----------------------------------------------
# Exporting takes minutes on two cores, so the export, runtime, TensorRT-gate, doctor and CLI
# tests share this bundle: four pieces with fp16 variants, int8 variants of the pieces in
# export.int8.INT8_PIECES, a voc20 text cache and, where tensorrt-rtx is installed,
# ahead-of-time engines (from the fp16 pieces).

BUNDLE_EXAMPLE = (128, 160, 5, 6)  # height, width, classes, masks of the export example
BUNDLE_CHECKS = ((96, 224, 3, 3), (160, 96, 9, 11))


def rtx_available() -> bool:
    try:
        import tensorrt_rtx  # noqa: F401
    except Exception:
        return False
    return True


@dataclass
class ExportedBundle:
    path: Path
    manifest: object  # runtime.manifest.Manifest
    log: list[str]


@pytest.fixture(scope="session")
def tiny_model():
    from scan_model.loading import load_model

    return load_model(None, "tiny", seed=0).model


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model, tmp_path_factory) -> ExportedBundle:
    from export.bundle import write_bundle
    from export.onnx_export import Shape
    from export.tensorrt import ShapeRanges
    from runtime.vocab import benchmark_vocabularies

    out = tmp_path_factory.mktemp("bundle") / "tiny"
    log: list[str] = []
    ranges = ShapeRanges(height=(64, 320, 640), width=(64, 320, 640), classes=(1, 10, 200), masks=(1, 16, 100),
                         prompts=(1, 16, 256))
    manifest = write_bundle(
        tiny_model, out, None, {"voc20": benchmark_vocabularies()["voc20"]},
        example=Shape(*BUNDLE_EXAMPLE), checks=tuple(Shape(*c) for c in BUNDLE_CHECKS),
        precision="fp16,int8", tensorrt=rtx_available(), ranges=ranges, trt_backend="tensorrt_rtx", report=log.append,
    )
    return ExportedBundle(out, manifest, log)


@pytest.fixture(autouse=True, scope="session")
def _private_user_cache(tmp_path_factory):
    """Text-embedding and engine caches go to a temporary folder, never the user's (platformdirs reads XDG)."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("user_cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = previous


# -- a `scan serve` process on localhost ----------------------------------------------------------------
@contextlib.contextmanager
def scan_server(serve_arguments: list[str], folder: Path, concurrency: int = 4):
    """`scan serve ARGS` on free localhost ports, once its model `scan` is ready, with an HTTP client.

    Yields a dict: process, client (tritonclient.http, `concurrency` connections), log, http, grpc,
    metrics. The server is stopped afterwards (SIGTERM, then SIGKILL after a minute).
    """
    import tritonclient.http

    from runtime.serving import MODEL_NAME, free_ports, hosting_problem

    if hosting_problem() is not None:
        pytest.skip(hosting_problem())
    http, grpc, metrics = free_ports(3)
    log = folder / "server.log"
    command = [sys.executable, "-m", "cli", "serve", *serve_arguments, "--http-port", str(http), "--grpc-port", str(grpc),
               "--metrics-port", str(metrics), "--exit-timeout", "5"]
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=PROJECT_ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        client = tritonclient.http.InferenceServerClient(f"localhost:{http}", concurrency=concurrency, network_timeout=300)
        try:
            deadline = time.time() + 240
            while time.time() < deadline and process.poll() is None:
                try:
                    if client.is_model_ready(MODEL_NAME):
                        break
                except Exception:  # not listening yet
                    pass
                time.sleep(0.5)
            else:
                pytest.fail(f"the server did not become ready: {log.read_text()[-4000:]}")
            yield {"process": process, "client": client, "log": log, "http": http, "grpc": grpc, "metrics": metrics}
        finally:
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()

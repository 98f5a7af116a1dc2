"""A bundle behind NVIDIA Triton Inference Server, through PyTriton: `scan serve`.

Triton owns the endpoints (HTTP, gRPC, metrics), the request queue and the dynamic batcher;
PyTriton runs our Python function as the model, one `Segmenter` per model instance. Requests and
answers are `runtime.serve_requests`'s (an image as pixels or as a PNG/JPEG file, optional class
names; label map, label scores, names, per-request error). Triton's dynamic batcher hands the
model several requests at once; each is segmented with its own vocabulary, whose text
embeddings come from the runtime's cache after the first request.

Triton's Python backend loads `libpython` through the dynamic linker. An interpreter whose shared
library is not the system's (pyenv, conda) would otherwise get the system's copy, another patch
release, and fail inside the backend (`'_thread.RLock' object has no attribute
'_recursion_count'`), so the server is started with the interpreter's own library first on the
search path; an interpreter built without one cannot host the backend (`scan doctor` says so).
"""

from __future__ import annotations

import os
import signal
import shutil
import socket
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ScanError
from .serve_requests import INPUTS, OUTPUTS, RequestHandler, RequestLimits

MODEL_NAME = "scan"


class ServeError(ScanError):
    """The server cannot start as asked; the message says why and what to do."""


@dataclass
class ServeConfig:
    bundle: Path
    backend: str | None = None  # None: runtime.choice picks
    precision: str | None = None
    threads: int | None = None  # ONNX Runtime threads per instance
    resize: bool = True  # the bundle's test resize; False feeds images at their own size
    vocab: str | None = None  # default vocabulary (requests may send their own)
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instances: int = 1
    max_batch_size: int = 4
    max_queue_delay_us: int = 2000  # how long Triton waits to fill a batch
    exit_timeout_s: int = 30  # on SIGINT/SIGTERM, how long in-flight requests may take to finish
    # Requests beyond these are refused with a message instead of tying an instance up for minutes.
    max_classes: int = 1024
    max_image_pixels: int = 40_000_000

    def validate(self) -> None:
        problems = []
        if self.instances < 1:
            problems.append(f"--instances must be at least 1, got {self.instances}")
        try:
            RequestLimits(self.max_classes, self.max_image_pixels).validate()
        except ScanError as exc:
            problems.append(str(exc))
        if self.max_batch_size < 1:
            problems.append(f"--max-batch-size must be at least 1, got {self.max_batch_size}")
        ports = (self.http_port, self.grpc_port, self.metrics_port)
        if any(not 0 < p < 65536 for p in ports) or len(set(ports)) != 3:
            problems.append(f"the HTTP, gRPC and metrics ports must be three different ports in 1..65535, got {ports}")
        if problems:
            raise ServeError("; ".join(problems))


def free_ports(count: int) -> list[int]:
    """`count` TCP ports of localhost that nothing listens on now (for servers started by tests and benchmarks)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for handle in sockets:
            handle.bind(("127.0.0.1", 0))
        return [handle.getsockname()[1] for handle in sockets]
    finally:
        for handle in sockets:
            handle.close()


# -- can this interpreter host Triton's Python backend? ----------------------------------------------


def shared_libpython() -> Path | None:
    """The interpreter's own shared library (libpython3.X.so), or None when it was built without one."""
    if not sysconfig.get_config_var("Py_ENABLE_SHARED"):
        return None
    libdir, name = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    path = Path(libdir or "") / (name or "")
    return path if path.is_file() else None


def hosting_problem() -> str | None:
    """Why this interpreter cannot host Triton's Python backend, or None when it can."""
    if shared_libpython() is None:
        return ("this Python has no shared libpython (built without --enable-shared), which Triton's Python "
                "backend loads: make the virtual environment from a Python that has one (the system's "
                "/usr/bin/python3, or pyenv with PYTHON_CONFIGURE_OPTS=--enable-shared)")
    return None


def backend_environment(environ: dict[str, str]) -> dict[str, str]:
    """`environ` with this interpreter's library folder first on LD_LIBRARY_PATH (see the module doc)."""
    library = shared_libpython()
    if library is None:
        return dict(environ)
    folders = [str(library.parent)] + [p for p in environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    return {**environ, "LD_LIBRARY_PATH": os.pathsep.join(dict.fromkeys(folders))}


# -- the model function --------------------------------------------------------------------------------


class _Instance:
    """One model instance: its own Segmenter (sessions are not shared between instances)."""

    def __init__(self, config: ServeConfig):
        from .segmenter import Segmenter

        segmenter = Segmenter(config.bundle, backend=config.backend, precision=config.precision,
                              threads=config.threads, resize=config.resize)
        self.handler = RequestHandler(segmenter, config.vocab, RequestLimits(config.max_classes, config.max_image_pixels))

    def __call__(self, requests) -> list[dict[str, np.ndarray]]:
        # Requests are answered one by one (not through PyTriton's @batch): each may carry its own
        # vocabulary and its image as pixels or as a file, and one's refusal must not touch another.
        return [self.handler.answer(dict(request.data), request.requested_output_names or None)
                for request in requests]


# -- the server -----------------------------------------------------------------------------------------


def serve(config: ServeConfig, on_ready=None) -> None:
    """Start Triton with the bundle bound as model `scan`; block until SIGINT or SIGTERM."""
    config.validate()
    problem = hosting_problem()
    if problem is not None:
        raise ServeError(problem)
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
        from pytriton.triton import Triton, TritonConfig, TritonSecurityConfig
    except ImportError:
        raise ServeError("scan serve needs PyTriton: pip install 'scan-deploy[serve]'") from None
    os.environ.update(backend_environment(dict(os.environ)))  # inherited by the server it starts
    instances = [_Instance(config) for _ in range(config.instances)]
    triton_config = TritonConfig(http_port=config.http_port, grpc_port=config.grpc_port,
                                 metrics_port=config.metrics_port, exit_on_error=True,
                                 exit_timeout_secs=config.exit_timeout_s)
    signal.signal(signal.SIGTERM, _interrupt)  # PyTriton stops cleanly on KeyboardInterrupt
    # PyTriton guards these endpoints with a generated token; statistics stay open (read-only, and
    # what operators watch batching with), as in a stock Triton server.
    security = TritonSecurityConfig(restricted_endpoints=["shared-memory", "model-repository", "trace", "logging"])
    with Triton(config=triton_config, security_config=security) as triton:
        triton.bind(
            model_name=MODEL_NAME,
            infer_func=instances,
            inputs=[Tensor(name=name, dtype=bytes if dtype is np.object_ else dtype, shape=shape, optional=optional)
                    for name, dtype, shape, optional in INPUTS],
            outputs=[Tensor(name=name, dtype=bytes if dtype is np.object_ else dtype, shape=shape)
                     for name, dtype, shape in OUTPUTS],
            config=ModelConfig(max_batch_size=config.max_batch_size,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=config.max_queue_delay_us)),
            strict=True,
        )
        triton.run()
        if on_ready is not None:
            on_ready()
        triton.serve()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


# -- a model repository on PyTriton's server binary -----------------------------------------------------


def repository_server(repository: Path, workspace: Path, http_port: int, grpc_port: int, metrics_port: int,
                      environ: dict[str, str] | None = None) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run PyTriton's `tritonserver` on a model repository.

    That build has only the Python backend: it serves repositories written with
    `--triton-backend python`. `workspace` (an empty folder) receives the backend folder the
    server needs (PyTriton's Python backend with the stub for this interpreter).
    """
    try:
        import pytriton
    except ImportError:
        raise ServeError("serving a repository here needs PyTriton's server: pip install 'scan-deploy[serve]'") from None
    problem = hosting_problem()
    if problem is not None:
        raise ServeError(problem)
    if not (Path(repository) / MODEL_NAME / "config.pbtxt").is_file():
        raise ServeError(f"{repository} is not a model repository `scan export --triton` wrote (no {MODEL_NAME}/config.pbtxt)")
    dist = Path(pytriton.__file__).parent / "tritonserver"
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = dist / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServeError(f"PyTriton has no Python backend stub for Python {version}: use Python 3.8-3.13")
    backend = Path(workspace) / "backends" / "python"
    backend.mkdir(parents=True)
    for item in (dist / "backends" / "python").iterdir():
        if item.is_file():
            (backend / item.name).symlink_to(item)
    shutil.copy(stub, backend / "triton_python_backend_stub")
    environ = backend_environment(dict(os.environ if environ is None else environ))
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    environ["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (environ.get("LD_LIBRARY_PATH", ""), str(libs)) if p)
    # The backend's stub runs this environment's Python packages (numpy, onnxruntime, ...).
    environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environ.get("PATH", "")])
    command = [str(dist / "bin" / "tritonserver"), f"--model-repository={Path(repository).resolve()}",
               f"--backend-directory={backend.parent}", f"--http-port={http_port}", f"--grpc-port={grpc_port}",
               f"--metrics-port={metrics_port}", "--exit-on-error=true", "--strict-readiness=true"]
    return command, environ

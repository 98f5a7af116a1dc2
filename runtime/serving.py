"""A bundle behind NVIDIA Triton Inference Server, through PyTriton: `scan serve`.

Triton owns the endpoints (HTTP, gRPC, metrics), the request queue and the dynamic batcher;
PyTriton runs our Python function as the model, one `Segmenter` per model instance. A request
carries one RGB image (uint8, H x W x 3) and, optionally, its own class names; the answer is the
label map (int32, H x W), the class names it indexes and `error`: empty, or why this request was
refused (Triton fails a whole batch when the model raises, so a bad request must not raise). Requests with the same image size and
vocabulary size are batched together by Triton; each image is then segmented with its own
vocabulary, whose text embeddings come from the runtime's cache after the first request.

Triton's Python backend loads `libpython` through the dynamic linker. An interpreter whose shared
library is not the system's (pyenv, conda) would otherwise get the system's copy, another patch
release, and fail inside the backend (`'_thread.RLock' object has no attribute
'_recursion_count'`), so the server is started with the interpreter's own library first on the
search path; an interpreter built without one cannot host the backend (`scan doctor` says so).
"""

from __future__ import annotations

import os
import signal
import socket
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ScanError

MODEL_NAME = "scan"


class ServeError(ScanError):
    """The server cannot start as asked; the message says why and what to do."""


@dataclass
class ServeConfig:
    bundle: Path
    backend: str = "onnxruntime"
    precision: str = "fp32"
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
        if self.max_classes < 1 or self.max_image_pixels < 1:
            problems.append("--max-classes and --max-image-pixels must be at least 1")
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

        self.segmenter = Segmenter(config.bundle, backend=config.backend, precision=config.precision,
                                   threads=config.threads, resize=config.resize)
        self.default = self.segmenter.set_vocabulary(config.vocab) if config.vocab else None
        self.max_classes, self.max_image_pixels = config.max_classes, config.max_image_pixels

    def __call__(self, requests):
        from pytriton.decorators import batch

        return batch(self._batch)(requests)

    def _batch(self, image: np.ndarray, classes: np.ndarray | None = None) -> dict[str, np.ndarray]:
        # Triton batches requests of one shape; an error raised here would fail every request of
        # the batch, so each request's own problem goes into its `error` output instead.
        labels, names_out, errors = [], [], []
        for index in range(image.shape[0]):
            count = len(self.default or []) if classes is None else classes.shape[1]
            try:
                names = self._names(None if classes is None else classes[index])
                self._check_image(image[index])
                self.segmenter.set_vocabulary(names)
                labels.append(self.segmenter.segment(image[index]).label_map.astype(np.int32))
                names_out.append([n.encode("utf-8") for n in names])
                errors.append(b"")
            except ScanError as exc:
                labels.append(np.zeros(image.shape[1:3], np.int32))
                names_out.append([b""] * count)
                errors.append(str(exc).encode("utf-8"))
        return {"labels": np.stack(labels), "classes": np.array(names_out, dtype=np.object_).reshape(len(labels), -1),
                "error": np.array(errors, dtype=np.object_).reshape(-1, 1)}

    def _names(self, raw: np.ndarray | None) -> list[str]:
        names = self.default if raw is None else _decode_names(raw)
        if names is None:
            raise ScanError("no class names in the request and no default vocabulary: send 'classes', "
                            "or start scan serve with --vocab")
        if len(names) > self.max_classes:
            raise ScanError(f"{len(names)} class names, more than this server's {self.max_classes}: send fewer, "
                            "or start scan serve with a larger --max-classes")
        return names

    def _check_image(self, pixels: np.ndarray) -> None:
        height, width = pixels.shape[:2]
        if height * width > self.max_image_pixels or min(height, width) < 1:
            raise ScanError(f"image of {width}x{height} pixels: this server takes 1 to {self.max_image_pixels} "
                            "pixels (--max-image-pixels); resize it before sending")


def _decode_names(raw: np.ndarray) -> list[str]:
    names = []
    for position, value in enumerate(raw.reshape(-1)):
        try:
            name = value.decode("utf-8") if isinstance(value, bytes) else str(value)
        except UnicodeDecodeError:
            raise ScanError(f"class name {position} is not valid UTF-8: send names as UTF-8 text") from None
        names.append(name)
    if not names:
        raise ScanError("the request's class list is empty: send at least one name, or none for the default")
    return names


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
            inputs=[Tensor(name="image", dtype=np.uint8, shape=(-1, -1, 3)),
                    Tensor(name="classes", dtype=bytes, shape=(-1,), optional=True)],
            outputs=[Tensor(name="labels", dtype=np.int32, shape=(-1, -1)),
                     Tensor(name="classes", dtype=bytes, shape=(-1,)),
                     Tensor(name="error", dtype=bytes, shape=(1,))],
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

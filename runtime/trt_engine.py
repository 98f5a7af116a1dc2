"""Running one TensorRT engine from numpy: `TensorRTRunner`, and `open_engines` for a bundle.

A runner follows the `PieceRunner` protocol that the ONNX Runtime runner shares: numpy in,
numpy out, on the host. Tensor-address execution (`set_input_shape`, `set_tensor_address`,
`execute_async_v3`) is the API that `tensorrt` 10/11 and `tensorrt_rtx` share. Device memory
comes from pycuda when it is importable, else from cuda-python (`cuda.bindings`); never torch.
Nothing here constructs a TensorRT runtime before a CUDA GPU has answered: without one the
runtime crashes the process instead of raising.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

import numpy as np

from .errors import ScanError
from .tensorrt import ShapeRanges, TensorRTUnavailable, collecting_logger, gpu_identity, load_tensorrt

NO_GPU_FIX = "run on a host with an NVIDIA GPU, or use --backend onnxruntime"


class PieceRunner(Protocol):
    name: str
    input_names: list[str]
    output_names: list[str]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


def require_gpu() -> str:
    """The slug of GPU 0, or one line saying why TensorRT engines cannot run here."""
    gpu, description = gpu_identity()
    if gpu is None:
        raise ScanError(f"{description}: TensorRT engines cannot run on this machine; {NO_GPU_FIX}")
    return gpu


class _CudaRuntime:
    """Device memory and a stream through cuda-python's runtime API (shares TensorRT's primary context)."""

    def __init__(self, device: int):
        from cuda.bindings import runtime as cudart

        self._rt, self.device = cudart, device
        self._check(cudart.cudaSetDevice(device), "cudaSetDevice")

    def _check(self, result, what: str):
        error, *rest = result if isinstance(result, tuple) else (result,)
        if error != self._rt.cudaError_t.cudaSuccess:
            name = getattr(error, "name", str(error))
            if "MemoryAllocation" in name:
                raise ScanError(f"{what}: the GPU is out of memory ({name}): use smaller images or fewer classes per call")
            raise RuntimeError(f"{what} failed: {name}")
        return rest[0] if len(rest) == 1 else rest

    def activate(self) -> None:
        self._check(self._rt.cudaSetDevice(self.device), "cudaSetDevice")  # per thread: serving uses several

    def alloc(self, nbytes: int) -> int:
        return int(self._check(self._rt.cudaMalloc(max(nbytes, 1)), "cudaMalloc"))

    def free(self, pointer: int) -> None:
        self._rt.cudaFree(pointer)

    def stream(self):
        return self._check(self._rt.cudaStreamCreate(), "cudaStreamCreate")

    def handle(self, stream) -> int:
        return int(stream)

    def to_device(self, pointer: int, array: np.ndarray, stream) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        self._check(self._rt.cudaMemcpyAsync(pointer, array.ctypes.data, array.nbytes, kind, stream), "cudaMemcpyAsync")

    def to_host(self, array: np.ndarray, pointer: int, stream) -> None:
        kind = self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        self._check(self._rt.cudaMemcpyAsync(array.ctypes.data, pointer, array.nbytes, kind, stream), "cudaMemcpyAsync")

    def synchronize(self, stream) -> None:
        self._check(self._rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def close_stream(self, stream) -> None:
        self._rt.cudaStreamDestroy(stream)


class _PyCuda:
    """The same through pycuda, on the device's primary context (the one TensorRT uses)."""

    def __init__(self, device: int):
        import pycuda.driver as drv

        drv.init()
        self._drv, self.device = drv, device
        self._context = drv.Device(device).retain_primary_context()
        self._allocations: dict[int, object] = {}
        self.activate()

    def activate(self) -> None:
        current = self._drv.Context.get_current()
        if current is None or current.handle != self._context.handle:  # pycuda keeps one per thread
            self._context.push()

    def alloc(self, nbytes: int) -> int:
        allocation = self._drv.mem_alloc(max(nbytes, 1))
        self._allocations[int(allocation)] = allocation
        return int(allocation)

    def free(self, pointer: int) -> None:
        self._allocations.pop(pointer).free()

    def stream(self):
        return self._drv.Stream()

    def handle(self, stream) -> int:
        return stream.handle

    def to_device(self, pointer: int, array: np.ndarray, stream) -> None:
        self._drv.memcpy_htod_async(pointer, array, stream)

    def to_host(self, array: np.ndarray, pointer: int, stream) -> None:
        self._drv.memcpy_dtoh_async(array, pointer, stream)

    def synchronize(self, stream) -> None:
        stream.synchronize()

    def close_stream(self, stream) -> None:
        pass  # pycuda frees its stream with the object


def _device_memory(device: int):
    try:
        import pycuda.driver  # noqa: F401
    except Exception:  # pycuda needs CUDA headers to build; most hosts have cuda-python instead
        try:
            from cuda.bindings import runtime  # noqa: F401
        except Exception:
            raise ScanError("TensorRT needs pycuda or cuda-python for GPU memory: pip install cuda-python") from None
        return _CudaRuntime(device)
    return _PyCuda(device)


def _numpy_dtypes(trt) -> dict:
    """TensorRT data types the runner can feed from numpy (bf16/fp8 have no numpy type)."""
    names = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64, "BOOL": np.bool_,
             "INT8": np.int8, "UINT8": np.uint8}
    return {getattr(trt.DataType, k): v for k, v in names.items() if hasattr(trt.DataType, k)}


class TensorRTRunner:
    """One engine, one execution context, one CUDA stream; device buffers cached per input shape set."""

    def __init__(self, plan_path: Path, name: str | None = None, backend: str | None = None, device: int = 0,
                 cached_shapes: int = 4):
        self.plan_path = Path(plan_path)
        self.name = name or self.plan_path.name.split(".")[0]
        self._context = None  # set last among the GPU objects: close() frees only what exists
        self._cached_shapes = cached_shapes
        self._buffers: OrderedDict[tuple, tuple[dict[str, int], dict[str, tuple[int, ...]]]] = OrderedDict()
        self._bound: tuple | None = None  # the shape set whose shapes and addresses the context holds
        self._lock = threading.Lock()
        trt, self.backend = load_tensorrt((backend,) if backend else ("tensorrt", "tensorrt_rtx"))
        require_gpu()  # before trt.Runtime: without a GPU it crashes the process
        self._memory = _device_memory(device)
        self._logger = collecting_logger(trt)
        self._runtime = trt.Runtime(self._logger)
        self._engine = self._runtime.deserialize_cuda_engine(self.plan_path.read_bytes())
        if self._engine is None:
            reason = self._logger.errors[-1] if self._logger.errors else "no message"
            raise ScanError(
                f"{self.backend} {trt.__version__} cannot load {self.plan_path} ({reason}): it was built by another "
                "TensorRT version or for another GPU; delete it so that it is rebuilt on this machine"
            )
        self._stream = self._memory.stream()
        self._context = self._engine.create_execution_context()
        if self._context is None:
            raise ScanError(f"{self.name}: TensorRT could not create an execution context (GPU memory full?): "
                            "free the GPU or use smaller shape ranges")
        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        is_input = {n: self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT for n in names}
        self.input_names = [n for n in names if is_input[n]]
        self.output_names = [n for n in names if not is_input[n]]
        dtypes = _numpy_dtypes(trt)
        self._dtypes = {}
        for n in names:
            dtype = self._engine.get_tensor_dtype(n)
            if dtype not in dtypes:
                raise ScanError(f"{self.name}: tensor {n!r} has TensorRT type {dtype}, which numpy cannot hold: "
                                "re-export the piece")
            self._dtypes[n] = np.dtype(dtypes[dtype])

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [n for n in self.input_names if n not in feeds]
        if missing or len(feeds) != len(self.input_names):
            raise ScanError(f"{self.name}: feeds {sorted(feeds)} do not match the engine's inputs {self.input_names}")
        # asarray, not ascontiguousarray: the latter turns 0-d inputs (mask_threshold) into shape (1,)
        arrays = {n: np.asarray(feeds[n], dtype=self._dtypes[n], order="C") for n in self.input_names}
        key = tuple(arrays[n].shape for n in self.input_names)
        with self._lock:  # one context and one stream: calls from several threads take turns
            self._memory.activate()
            pointers, output_shapes = self._bind(key)
            for n in self.input_names:
                self._memory.to_device(pointers[n], arrays[n], self._stream)
            if not self._context.execute_async_v3(self._memory.handle(self._stream)):
                reason = self._logger.errors[-1] if self._logger.errors else "no message"
                raise RuntimeError(f"{self.name}: TensorRT execution failed: {reason}")
            outputs = {n: np.empty(output_shapes[n], dtype=self._dtypes[n]) for n in self.output_names}
            for n in self.output_names:
                self._memory.to_host(outputs[n], pointers[n], self._stream)
            self._memory.synchronize(self._stream)  # the host arrays are complete only after this
        return outputs

    def _bind(self, key: tuple) -> tuple[dict[str, int], dict[str, tuple[int, ...]]]:
        """Shapes and device buffers for this input shape set: allocated once, reused while cached."""
        entry = self._buffers.get(key)
        if entry is not None and self._bound == key:
            self._buffers.move_to_end(key)
            return entry
        self._bound = None  # until every shape and address below is set: a refused shape leaves a mixed state
        for n, shape in zip(self.input_names, key):
            if not self._context.set_input_shape(n, shape):
                low, _, high = self._engine.get_tensor_profile_shape(n, 0)
                raise ScanError(
                    f"{self.name}: input {n!r} of shape {tuple(shape)} is outside the engine's profile "
                    f"(min {tuple(low)}, max {tuple(high)}): use a smaller image or fewer classes/masks, or rebuild "
                    "the engines with wider ranges (open_engines(..., ranges=ShapeRanges(...)))"
                )
        if entry is None:
            shapes = {n: tuple(self._context.get_tensor_shape(n)) for n in self.output_names}
            if any(d < 0 for s in shapes.values() for d in s):  # data-dependent outputs need an output allocator
                raise ScanError(f"{self.name}: outputs {shapes} have data-dependent shapes, which this runtime "
                                "does not support: re-export the piece")
            all_shapes = {**dict(zip(self.input_names, key)), **shapes}
            pointers = {n: self._memory.alloc(int(np.prod(s, dtype=np.int64)) * self._dtypes[n].itemsize)
                        for n, s in all_shapes.items()}
            entry = self._buffers[key] = (pointers, shapes)
            while len(self._buffers) > self._cached_shapes:  # evict the least recently used shape set
                _, (old, _) = self._buffers.popitem(last=False)
                for pointer in old.values():
                    self._memory.free(pointer)
        for n, pointer in entry[0].items():
            self._context.set_tensor_address(n, pointer)
        self._buffers.move_to_end(key)
        self._bound = key
        return entry

    def close(self) -> None:
        """Free the device buffers and stream; the context goes before the engine and runtime."""
        if getattr(self, "_context", None) is None:
            return
        with self._lock:
            self._release()

    def _release(self) -> None:
        self._memory.activate()
        self._memory.synchronize(self._stream)
        for pointers, _ in self._buffers.values():
            for pointer in pointers.values():
                self._memory.free(pointer)
        self._buffers.clear()
        self._memory.close_stream(self._stream)
        self._context = None
        self._engine = None
        self._runtime = None

    def __del__(self) -> None:
        try:  # runners dropped without close(): give the GPU memory back while CUDA is still up
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "TensorRTRunner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TensorRTRunner({self.name!r}, {self.plan_path}, inputs={self.input_names}, outputs={self.output_names})"


def open_engines(bundle_root: Path, manifest, precision: str, ranges: ShapeRanges | None = None,
                 build_missing: bool = True, report=print) -> dict[str, TensorRTRunner]:
    """A runner per piece from the engine folder made for this GPU, TensorRT version and precision.

    Missing engines are built from the bundle's ONNX pieces (minutes, once per GPU); see
    `runtime.engine_store.engine_plans` for where they come from and where new ones go.
    """
    from .engine_store import engine_plans

    try:
        trt, backend = load_tensorrt()
    except TensorRTUnavailable as exc:
        raise TensorRTUnavailable(f"{exc}; or use --backend onnxruntime") from None
    gpu = require_gpu()
    plans = engine_plans(Path(bundle_root), manifest, precision, gpu, ranges=ranges, build_missing=build_missing,
                         report=report, backend=backend)
    return {piece: TensorRTRunner(path, name=piece, backend=backend) for piece, path in plans.items()}

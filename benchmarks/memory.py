"""Memory while a backend runs: resident set size sampled by a thread, and GPU memory.

The RSS is the whole process's (every backend of a run lives in one process); what is
attributed to a backend is the peak seen while its calls ran, next to the RSS before its
first call, so a reader can take the difference.
"""

from __future__ import annotations

import os
import resource
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

STATM = Path("/proc/self/statm")
SAMPLE_INTERVAL_S = 0.005


def proc_available() -> bool:
    return STATM.is_file()


def current_rss() -> int:
    """Resident bytes now (/proc/self/statm), else the lifetime peak from getrusage."""
    if proc_available():
        return int(STATM.read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS reports bytes, Linux KiB


class RssSampler:
    """Peak RSS per owner: a thread samples every `interval` s while an owner's block runs.

    Usage: `with RssSampler() as rss: with rss.attribute("eager"): ...`; then `rss.peaks`.
    A block is also sampled at its start and end, so blocks shorter than the interval count.
    Without /proc (macOS, ...) the numbers are the process's lifetime peak: `source` says so.
    """

    def __init__(self, interval: float = SAMPLE_INTERVAL_S):
        self.interval = interval
        self.source = ("/proc/self/statm, sampled every %g ms" % (interval * 1e3) if proc_available()
                       else "getrusage ru_maxrss: the process's lifetime peak, not per backend")
        self.peaks: dict[str, int] = {}
        self.before: dict[str, int] = {}  # RSS just before an owner's first block
        self._owner: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "RssSampler":
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @contextmanager
    def attribute(self, owner: str):
        rss = current_rss()
        self.before.setdefault(owner, rss)
        self._record(owner, rss)
        self._owner = owner
        try:
            yield
        finally:
            self._owner = None
            self._record(owner, current_rss())

    def _record(self, owner: str, rss: int) -> None:
        with self._lock:
            self.peaks[owner] = max(self.peaks.get(owner, 0), rss)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            owner = self._owner
            if owner is None:
                continue
            rss = current_rss()
            if self._owner == owner:  # the block did not end while we read: the sample is its
                self._record(owner, rss)


def device_memory_in_use() -> int | None:
    """Bytes in use on GPU 0 (every process and context: total - free), None without a GPU.

    For TensorRT and ONNX Runtime on CUDA, which allocate outside PyTorch's allocator.
    """
    try:
        from cuda.bindings import runtime as cudart

        error, free, total = cudart.cudaMemGetInfo()
        if error == cudart.cudaError_t.cudaSuccess:
            return int(total - free)
    except Exception:  # cuda-python missing or no GPU: ask torch, the other binding benchmarks have
        pass
    try:
        import torch

        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            return int(total - free)
    except Exception:
        pass
    return None

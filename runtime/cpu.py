"""What this CPU executes natively: the vector features that decide the CPU backend and precision.

OpenVINO lists "BF16" among its capabilities on any AVX-512 CPU, also where bfloat16 is only
emulated (and then slower than f32), so the decision reads the kernel's CPU flags instead:
native BF16 needs AVX512-BF16 or AMX-BF16. `CpuInfo` is a plain value: a caller that wants to
plan for another CPU (or force f32) passes a changed copy, e.g.
`dataclasses.replace(cpu_info(), native_bf16=False)`.
"""

from __future__ import annotations

import hashlib
import platform
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

# The flags that change what a compiled CPU kernel may use: part of the compiled-model cache key.
KERNEL_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16",
                "amx_tile", "amx_bf16", "amx_int8", "avx512_fp16", "amx_fp16")


@dataclass(frozen=True)
class CpuInfo:
    """The CPU's model name and the vector features that matter for inference."""

    model: str
    flags: frozenset[str] = field(default_factory=frozenset)
    native_bf16: bool = False  # bfloat16 in hardware (AVX512-BF16 or AMX); set by detection

    @property
    def avx2(self) -> bool:
        return "avx2" in self.flags

    @property
    def avx512(self) -> bool:
        return "avx512f" in self.flags

    @property
    def vnni(self) -> bool:
        return bool({"avx512_vnni", "avx_vnni"} & self.flags)

    @property
    def amx(self) -> bool:
        return bool({"amx_tile", "amx_bf16", "amx_int8"} & self.flags)

    def features(self) -> dict[str, bool]:
        """The report `scan doctor` and the benchmarks print next to every figure."""
        return {"AVX2": self.avx2, "AVX-512": self.avx512, "VNNI": self.vnni, "BF16": self.native_bf16, "AMX": self.amx}

    def describe(self) -> str:
        present = [name for name, ok in self.features().items() if ok]
        return f"{self.model} ({', '.join(present) or 'no AVX2'}; native BF16: {'yes' if self.native_bf16 else 'no'})"

    def key(self) -> str:
        """A file-name-safe key of what compiled kernels depend on: model name and kernel flags."""
        slug = re.sub(r"[^a-z0-9]+", "-", self.model.lower()).strip("-")[:40] or "cpu"
        kernel = ",".join(f for f in KERNEL_FLAGS if f in self.flags) + f";bf16={int(self.native_bf16)}"
        return f"{slug}-{hashlib.sha256(kernel.encode()).hexdigest()[:8]}"


def parse_cpuinfo(text: str) -> CpuInfo:
    """`CpuInfo` from the text of /proc/cpuinfo (the first processor's entries)."""
    model, flags = "", frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
    native = bool({"avx512_bf16", "amx_bf16"} & flags)
    return CpuInfo(model or platform.processor() or platform.machine() or "unknown CPU", flags, native)


@lru_cache(maxsize=1)
def cpu_info() -> CpuInfo:
    """This machine's CPU. Without /proc/cpuinfo (not Linux) no feature is assumed: f32 is always safe."""
    try:
        return parse_cpuinfo(Path("/proc/cpuinfo").read_text(errors="replace"))
    except OSError:
        return CpuInfo(platform.processor() or platform.machine() or "unknown CPU")

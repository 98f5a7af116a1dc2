"""TensorRT for the exporter: the build code lives in the torch-free `runtime.tensorrt`.

The runtime builds engines lazily on a deployment host, so profiles, folder naming and
`build_engine` belong there; this module keeps the names export code and the CLI import.
"""

from __future__ import annotations

from runtime.tensorrt import (  # re-exported for export/, the CLI and tests
    BACKENDS,
    BuildResult,
    ShapeRanges,
    TensorRTUnavailable,
    build_engine,
    engine_folder_name,
    gpu_identity,
    load_tensorrt,
    piece_profiles,
    profile_record,
    trt_version,
)

__all__ = [
    "BACKENDS", "BuildResult", "ShapeRanges", "TensorRTUnavailable", "build_engine", "engine_folder_name",
    "gpu_identity", "load_tensorrt", "piece_profiles", "profile_record", "trt_version",
]

"""The torch-free runtime: run an exported SCAN bundle with numpy and ONNX Runtime or TensorRT.

    from runtime import Segmenter
    segmenter = Segmenter("bundles/vitb")            # backend="tensorrt" on a GPU host
    segmenter.set_vocabulary("ade150")
    result = segmenter.segment("photo.jpg")           # result.label_map, result.classes, result.timings

The public surface is `Segmenter`, `SegmentationResult`, `InferenceSettings` and `ScanError`;
everything else in this package is internal.
"""

from __future__ import annotations

from .errors import ScanError

__all__ = ["InferenceSettings", "ScanError", "SegmentationResult", "Segmenter"]


def __getattr__(name: str):
    # Imported on first use, so that `import runtime.vocab` (used by the eager model) stays light.
    if name == "Segmenter":
        from .segmenter import Segmenter

        return Segmenter
    if name == "SegmentationResult":
        from .result import SegmentationResult

        return SegmentationResult
    if name == "InferenceSettings":
        from .settings import InferenceSettings

        return InferenceSettings
    raise AttributeError(f"module 'runtime' has no attribute {name!r}")

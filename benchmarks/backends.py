"""The backends `scan bench` compares, behind one interface: the eager model and the runtime's.

A backend name is `kind` or `kind-precision`: `eager`, `onnxruntime`, `onnxruntime-int8`,
`openvino` (bf16 where the CPU has it natively, else fp32: the runtime's default), `openvino-fp32`,
`openvino-int8`, `tensorrt`, `tensorrt-fp16`, ... The runtime decides which precisions a bundle and
a backend support (`runtime.Segmenter` raises a ScanError otherwise); the parser only knows the words.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

import numpy as np

from runtime.errors import ScanError

from .memory import device_memory_in_use

KINDS = ("eager", "onnxruntime", "openvino", "tensorrt")
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
EXAMPLES = ("eager, onnxruntime, onnxruntime-int8, openvino, openvino-fp32, openvino-bf16, openvino-int8, "
            "tensorrt, tensorrt-fp16")


@dataclass(frozen=True)
class BackendName:
    kind: str
    precision: str | None = None  # None: the runtime's default for this kind

    @property
    def name(self) -> str:
        return self.kind if self.precision is None else f"{self.kind}-{self.precision}"

    @property
    def variant(self) -> str:
        """The bundle pieces it reads: bf16 (and the default) compile the fp32 pieces."""
        return "fp32" if self.precision in (None, "bf16") else self.precision


def parse_backends(text: str) -> list[BackendName]:
    """'eager,onnxruntime-int8' -> BackendNames; unknown or repeated names are one-line errors."""
    words = [w.strip().lower() for w in str(text).split(",") if w.strip()]
    if not words:
        raise ScanError(f"--backends is empty: name one or more of {EXAMPLES}")
    parsed: list[BackendName] = []
    for word in words:
        kind, _, precision = word.partition("-")
        # fp32 is the default of onnxruntime and tensorrt; openvino's default is bf16 where native.
        precision = None if not precision or (precision == "fp32" and kind in ("onnxruntime", "tensorrt")) else precision
        if kind not in KINDS or (precision is not None and precision not in PRECISIONS) or (kind == "eager" and precision):
            raise ScanError(f"unknown backend {word!r}: choose from {EXAMPLES} "
                            f"(a runtime backend takes -{' or -'.join(PRECISIONS)})")
        name = BackendName(kind, precision)
        if name in parsed:
            raise ScanError(f"backend {name.name!r} is named twice in --backends: name each once")
        parsed.append(name)
    return parsed


@dataclass
class TextCost:
    """Seconds to set a vocabulary: cold (nothing cached) and warm (a new object on the same cache)."""

    cold_s: float
    warm_s: float | None
    cold_encoder_calls: int | None
    warm_encoder_calls: int | None


@dataclass
class RegionStage:
    """One image's proposals, ready for the region classifier alone.

    `row_max[q]` is proposal q's highest mask probability; `run(rows, threshold)` classifies
    exactly the proposals `rows` (all of which exceed `threshold`) and returns their count.
    """

    row_max: np.ndarray
    run: Callable[[np.ndarray, float], int]


class _NoClock:
    """The runtime's stage clock, ignored: the region sweep times the stage from outside."""

    def lap(self, name: str) -> None:
        pass


class RuntimeBackend:
    """`runtime.Segmenter` with ONNX Runtime or TensorRT at one precision."""

    def __init__(self, name: BackendName, bundle: Path, threads: int, resize: bool, cache_root: Path, report=print):
        from runtime.segmenter import Segmenter

        self.name, self.kind, self.precision = name.name, name.kind, name.precision
        self._open = partial(Segmenter, bundle, backend=name.kind, precision=name.precision, threads=threads,
                             resize=resize, report=report)
        self._cache_root = cache_root / self.name
        self.segmenter = self._open(cache_dir=self._cache_root / "main")
        self.precision = self.segmenter.precision  # what runs (the default resolved, bf16 -> fp32 without native BF16)
        self.notes = self.segmenter.notes
        runners = self.segmenter.runners.values()
        self.providers = list(dict.fromkeys(p for r in runners for p in getattr(r, "providers", [getattr(r, "backend", name.kind)])))
        self.uses_gpu = name.kind == "tensorrt" or "CUDAExecutionProvider" in self.providers
        self.device = "cuda:0" if self.uses_gpu else "cpu"

    def set_vocabulary(self, names: list[str]) -> None:
        self.segmenter.set_vocabulary(names)

    def segment(self, image):
        return self.segmenter.segment(image)

    def segment_batch(self, images):
        return self.segmenter.segment_batch(images)

    def begin_call(self) -> None:
        pass

    def gpu_bytes(self) -> int | None:
        return device_memory_in_use() if self.uses_gpu else None

    def text_cost(self, names: list[str], tag: str) -> TextCost:
        """Cold: a new Segmenter on an empty cache folder, every name through the text encoder; warm: another on it."""
        folder = self._cache_root / f"text-{tag}"
        cold = self._open(cache_dir=folder, verify="size")
        # The bundle's own text caches (e.g. `--standard-vocabs`) would answer some names without
        # the encoder; cold means the encoder's cost, so they are left out of this one object.
        cold._text._bundle_caches.clear()
        start = time.perf_counter()
        cold.set_vocabulary(names)
        cold_s, cold_calls = time.perf_counter() - start, cold.text_encoder_calls
        del cold
        warm = self._open(cache_dir=folder, verify="size")
        start = time.perf_counter()
        warm.set_vocabulary(names)
        return TextCost(cold_s, time.perf_counter() - start, cold_calls, warm.text_encoder_calls)

    def region_stage(self, image: np.ndarray) -> RegionStage:
        seg = self.segmenter
        proposals = seg._propose(image, _NoClock())
        probs = proposals.probs

        def run(rows: np.ndarray, threshold: float) -> int:
            valid = np.zeros(probs.shape[0], dtype=bool)
            valid[rows] = True
            seg._classify_regions(image, probs, valid, proposals.shift_tokens, seg.settings.replace(mask_threshold=threshold))
            return int(valid.sum())

        return RegionStage(probs.reshape(probs.shape[0], -1).max(axis=1), run)


class EagerBackend:
    """The PyTorch reference model (`EagerSegmenter`) on the CPU or a CUDA device."""

    kind, precision = "eager", "fp32"

    def __init__(self, model, resize: bool, seed: int):
        from scan_model.segmenter import EagerSegmenter

        self.name = "eager"
        self.segmenter = EagerSegmenter(model, resize=resize, seed=seed)
        self._new = partial(EagerSegmenter, model, resize=resize, seed=seed)
        self.device = str(self.segmenter.device)
        self.uses_gpu = self.segmenter.device.type == "cuda"
        self.providers = [f"pytorch-{self.segmenter.device.type}"]

    def set_vocabulary(self, names: list[str]) -> None:
        self.segmenter.set_vocabulary(names)

    def segment(self, image):
        return self.segmenter.segment(image)

    def segment_batch(self, images):
        return [self.segmenter.segment(image) for image in images]  # the eager model takes one image per call

    def begin_call(self) -> None:
        if self.uses_gpu:
            import torch

            torch.cuda.reset_peak_memory_stats(self.segmenter.device)

    def gpu_bytes(self) -> int | None:
        if not self.uses_gpu:
            return None
        import torch

        return int(torch.cuda.max_memory_allocated(self.segmenter.device))

    def text_cost(self, names: list[str], tag: str) -> TextCost:
        """Cold only: the eager model keeps no text cache across objects."""
        fresh = self._new()
        start = time.perf_counter()
        fresh.set_vocabulary(names)
        self._synchronize()
        return TextCost(time.perf_counter() - start, None, None, None)

    def region_stage(self, image: np.ndarray) -> RegionStage:
        import torch

        from scan_model.ensemble import upsample_masks

        seg = self.segmenter
        model, classifier = seg.model, seg._classifier
        tensor = torch.from_numpy(np.array(image, dtype=np.uint8)).to(seg.device).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            features = model.encode_image(tensor)
            decoded = model.decode(features, classifier)
            probs = upsample_masks(decoded.mask_logits, features.padded_size, features.image_size)[0].sigmoid()
        shift_tokens = features.global_clip.layer_cls[0]

        def run(rows: np.ndarray, threshold: float) -> int:
            with torch.no_grad():
                out = model.classify_regions(tensor[0], probs[torch.as_tensor(rows, device=probs.device)], classifier,
                                             shift_tokens, rng=seg.rng, settings=seg.settings.replace(mask_threshold=threshold))
            self._synchronize()
            return int(out.valid.sum())

        return RegionStage(probs.flatten(1).max(dim=1).values.cpu().numpy(), run)

    def _synchronize(self) -> None:
        if self.uses_gpu:
            import torch

            torch.cuda.synchronize(self.segmenter.device)

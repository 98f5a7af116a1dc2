"""Calibration inputs for reduced precision: the pieces' own inputs, as the runtime sends them.

The fp32 bundle being written segments the calibration images with ONNX Runtime, and every
call of every piece is recorded (inputs and fp32 outputs). NNCF measures activation ranges on
the recorded inputs (export/int8.py), and the per-piece numeric gate compares int8 and bf16
runs with the recorded fp32 outputs (export/precision_checks.py). Recording the deployed path,
rather than the eager model, gives the inputs in the shapes and batches the runtime really uses
(for example the CLIP adapter's region batches under its memory budget).

Images: `scan export --calibration PATH`, a folder of images or a dataset (a generic folder or a
benchmark name: its train split and its class names), sampled evenly up to CALIBRATION_IMAGES
and run through the model's test resize. Without it, the export gate's own drawn scenes (one
per gate shape, three by default): they need no data, but they are not what a trained model
saw, so a deployment should calibrate on its own images (docs/performance.md).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from runtime.errors import ScanError
from runtime.datasets import IMAGE_SUFFIXES
from runtime.images import load_image

CALIBRATION_IMAGES = 8  # the tiny measurement calibrated on 8; NNCF's statistics settle there
MAX_CALLS = 64  # calls per piece kept (evenly spaced): a vitb image sends the CLIP adapter about 25
CHECK_CALLS = 16  # of those, the calls the numeric gate runs again in reduced precision
GATE_VOCABULARY = 10  # the gate's ten ADE names for drawn scenes; a dataset brings its own names


@dataclass
class CalibrationSet:
    images: list[np.ndarray]
    names: list[str]  # the vocabulary set while segmenting them
    resize: bool  # the model's test resize (user images) or none (drawn scenes at the gate's shapes)
    source: str  # for the manifest and the log

    def describe(self) -> str:
        return f"{len(self.images)} {self.source}"


@dataclass
class Recording:
    """Per piece, the calls the runtime made: inputs and the fp32 outputs."""

    inputs: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)
    outputs: dict[str, list[dict[str, np.ndarray]]] = field(default_factory=dict)

    def calls(self, piece: str, limit: int) -> list[int]:
        """Indices of at most `limit` calls of `piece`, evenly spaced over the recording."""
        count = len(self.inputs.get(piece, []))
        return sorted({int(i) for i in np.linspace(0, count - 1, min(count, limit))}) if count else []


def calibration_set(path: str | Path | None, gate_shapes, limit: int = CALIBRATION_IMAGES) -> CalibrationSet:
    """The images of `--calibration PATH`, or the export gate's drawn scenes when `path` is None."""
    from runtime.vocab import benchmark_vocabularies

    ade = benchmark_vocabularies()["ade150"]
    if path is None:
        from runtime.synthetic import synthetic_scene

        images = [synthetic_scene(s.height, s.width, seed=3) for s in gate_shapes]  # the pipeline gate's scenes
        return CalibrationSet(images, ade[:GATE_VOCABULARY], False, "drawn scenes of the export gate")
    folder = Path(path)
    if folder.is_dir() and _image_files(folder):
        files = _image_files(folder)
        return CalibrationSet([load_image(f) for f in _evenly(files, limit)], ade, True, f"images of {folder}")
    from runtime.datasets import DatasetError, open_dataset

    try:
        dataset = open_dataset(str(path), split="train")
    except DatasetError as exc:
        raise ScanError(f"--calibration {path}: not a folder of images nor a dataset ({exc})") from None
    chosen = _evenly(list(range(len(dataset))), limit)
    return CalibrationSet([dataset.read(i)[0] for i in chosen], list(dataset.class_names), True,
                          f"train images of {dataset.name}")


def record_pieces(bundle: Path, calibration: CalibrationSet, threads: int | None = None) -> Recording:
    """Segment the calibration images with the fp32 bundle at `bundle`, recording every piece call."""
    from runtime.manifest import read_manifest
    from runtime.onnxruntime_backend import OnnxRuntimeRunner
    from runtime.segmenter import Segmenter

    manifest = read_manifest(bundle)
    recording = Recording()
    runners = {name: _Recorder(name, OnnxRuntimeRunner(name, bundle / piece.file, None, threads), recording)
               for name, piece in manifest.pieces.items()}
    with tempfile.TemporaryDirectory(prefix="scan-calibration-text-") as cache:
        segmenter = Segmenter(bundle, runners=runners, resize=calibration.resize, cache_dir=cache)
        segmenter.set_vocabulary(calibration.names)
        for image in calibration.images:
            segmenter.segment(image)
    return recording


class _Recorder:
    """A runner that keeps copies of what passes through (at most MAX_CALLS per piece, evenly)."""

    def __init__(self, name: str, runner, recording: Recording):
        self.name, self.runner, self.recording = name, runner, recording
        self.seen, self.stride = 0, 1  # keeps calls whose index is a multiple of the stride

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self.runner.run(feeds)
        inputs = self.recording.inputs.setdefault(self.name, [])
        kept = self.recording.outputs.setdefault(self.name, [])
        if self.seen % self.stride == 0:
            inputs.append({k: np.array(v) for k, v in feeds.items()})
            kept.append({k: np.array(v) for k, v in outputs.items()})
            if len(inputs) > MAX_CALLS:  # double the stride: memory stays bounded, calls stay spread out
                del inputs[1::2], kept[1::2]
                self.stride *= 2
        self.seen += 1
        return outputs

    def __getattr__(self, name):
        return getattr(self.runner, name)


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in IMAGE_SUFFIXES)


def _evenly(items: list, limit: int) -> list:
    if len(items) <= limit:
        return list(items)
    return [items[int(i)] for i in np.linspace(0, len(items) - 1, limit).round()]

"""One served request: what it carries, what it gets back, and its checks.

Shared by `scan serve` (PyTriton) and the orchestrator of a `scan export --triton` model
repository (Triton's Python backend), so both answer a request the same way.

A request carries one image per row of its batch axis, either as pixels (`image`, uint8
H x W x 3) or as an encoded file (`image_bytes`, PNG/JPEG), and optionally its own class names
(`classes`). The answer per row: `labels` (int32 H x W), `scores` (float32 H x W, the score of
each pixel's label), `classes` (the names `labels` indexes) and `error`: empty, or why this row
was refused. Triton fails every request of a batch when the model raises, so a bad request is
answered with its `error` instead of raising.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import ScanError
from .images import as_rgb_array, decode_image

# name, numpy dtype, shape without the batch axis, optional
INPUTS = (("image", np.uint8, (-1, -1, 3), True),
          ("image_bytes", np.object_, (1,), True),
          ("classes", np.object_, (-1,), True))
OUTPUTS = (("labels", np.int32, (-1, -1)),
           ("scores", np.float32, (-1, -1)),
           ("classes", np.object_, (-1,)),
           ("error", np.object_, (1,)))
INPUT_NAMES = tuple(name for name, *_ in INPUTS)
OUTPUT_NAMES = tuple(name for name, *_ in OUTPUTS)


@dataclass(frozen=True)
class RequestLimits:
    """Requests beyond these are refused with a message instead of tying an instance up for minutes."""

    max_classes: int = 1024
    max_image_pixels: int = 40_000_000

    def validate(self) -> None:
        if self.max_classes < 1 or self.max_image_pixels < 1:
            raise ScanError("--max-classes and --max-image-pixels must be at least 1")


class RequestHandler:
    """Answers requests with one `Segmenter` (or anything with its set_vocabulary/segment)."""

    def __init__(self, segmenter, vocab=None, limits: RequestLimits = RequestLimits()):
        self.segmenter = segmenter
        self.default = segmenter.set_vocabulary(vocab) if vocab else None
        self.limits = limits

    def answer(self, inputs: dict[str, np.ndarray], requested: list[str] | None = None) -> dict[str, np.ndarray]:
        """One request's inputs (each with its batch axis first) -> its outputs (`requested` ones only, if given)."""
        rows = _row_count(inputs)
        answers = [self._row(inputs, index) for index in range(rows)]
        if len({a["labels"].shape for a in answers}) > 1 or len({len(a["classes"]) for a in answers}) > 1:
            # Rows of one request are stacked into one tensor per output: they must share a size.
            message = "the images of one request decode to different sizes: send them as separate requests"
            answers = [_refusal((1, 1), max(len(a["classes"]) for a in answers), message) for a in answers]
        outputs = {
            "labels": np.stack([a["labels"] for a in answers]),
            "scores": np.stack([a["scores"] for a in answers]),
            "classes": np.array([a["classes"] for a in answers], dtype=np.object_).reshape(rows, -1),
            "error": np.array([a["error"] for a in answers], dtype=np.object_).reshape(rows, 1),
        }
        return outputs if requested is None else {name: outputs[name] for name in requested if name in outputs}

    def _row(self, inputs: dict[str, np.ndarray], index: int) -> dict:
        classes = inputs.get("classes")
        count = len(self.default or []) if classes is None else classes.shape[1]
        image = inputs.get("image")
        size = image.shape[1:3] if image is not None else (1, 1)
        try:
            names = self._names(None if classes is None else classes[index])
            pixels = self._pixels(image, inputs.get("image_bytes"), index)
            size = pixels.shape[:2]
            if names != self.segmenter.classes:  # most requests repeat the last vocabulary
                self.segmenter.set_vocabulary(names)
            result = self.segmenter.segment(pixels)
        except ScanError as exc:
            return _refusal(size, count, str(exc))
        return {"labels": result.label_map.astype(np.int32), "scores": result.label_scores.astype(np.float32),
                "classes": [name.encode("utf-8") for name in names], "error": b""}

    def _names(self, raw: np.ndarray | None) -> list[str]:
        names = self.default if raw is None else decode_names(raw)
        if names is None:
            raise ScanError("no class names in the request and no default vocabulary: send 'classes', "
                            "or start the server with a default vocabulary (--vocab)")
        if len(names) > self.limits.max_classes:
            raise ScanError(f"{len(names)} class names, more than this server's {self.limits.max_classes}: send fewer, "
                            "or start the server with a larger --max-classes")
        return names

    def _pixels(self, image: np.ndarray | None, encoded: np.ndarray | None, index: int) -> np.ndarray:
        if (image is None) == (encoded is None):
            raise ScanError("send the image either as 'image' (uint8 HxWx3) or as 'image_bytes' (PNG/JPEG), not both or neither")
        if encoded is not None:
            data = encoded[index].reshape(-1)[0]
            return decode_image(data if isinstance(data, bytes) else bytes(data), self.limits.max_image_pixels)
        height, width = image.shape[1:3]
        if height * width > self.limits.max_image_pixels:
            raise ScanError(f"image of {width}x{height} pixels: this server takes at most {self.limits.max_image_pixels} "
                            "pixels (--max-image-pixels); resize it before sending")
        return as_rgb_array(image[index])


def decode_names(raw: np.ndarray) -> list[str]:
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


def _row_count(inputs: dict[str, np.ndarray]) -> int:
    counts = {value.shape[0] for value in inputs.values()}
    return counts.pop() if len(counts) == 1 else 1


def _refusal(size, count: int, message: str) -> dict:
    return {"labels": np.zeros(size, np.int32), "scores": np.zeros(size, np.float32),
            "classes": [b""] * max(count, 1), "error": message.encode("utf-8")}

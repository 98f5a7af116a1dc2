"""A client of `scan serve`: the served model behind the `Segmenter` calls `scan segment` makes.

`ServedSegmenter("localhost:8000")` (HTTP) or `ServedSegmenter("grpc://localhost:8001")` sends each
image with the current vocabulary's names through `tritonclient` and returns the label map in a
`SegmentationResult` (with each pixel's label score), so local and served segmentation write the
same outputs. The inference settings are the served bundle's; the full score maps stay on the server.
"""

from __future__ import annotations

import time

import numpy as np

from .errors import ScanError
from .images import as_rgb_array, load_image
from .result import SegmentationResult
from .serving import MODEL_NAME
from .vocab import parse_vocabulary


class ServedSegmenter:
    def __init__(self, url: str, model: str = MODEL_NAME, timeout_s: float = 300.0):
        self.model = model
        self.grpc = url.startswith("grpc://")
        address = url.split("://", 1)[1] if "://" in url else url
        try:
            if self.grpc:
                import tritonclient.grpc as client_module
            else:
                import tritonclient.http as client_module
        except ImportError:
            raise ScanError("a served model needs tritonclient: pip install 'scan-deploy[serve]'") from None
        self._module = client_module
        if self.grpc:
            self._client = client_module.InferenceServerClient(address)
        else:
            self._client = client_module.InferenceServerClient(address, network_timeout=timeout_s,
                                                               connection_timeout=timeout_s)
        try:
            ready = self._client.is_model_ready(model)
        except Exception as exc:  # refused connection, DNS, ...: one line for the user
            raise ScanError(f"no Triton server answers at {url}: {str(exc).splitlines()[0]}; start one with "
                            "`scan serve --bundle B`") from None
        if not ready:
            raise ScanError(f"the server at {url} has no ready model {model!r}")
        self.classes: list[str] = []

    def set_vocabulary(self, vocabulary) -> list[str]:
        self.classes = parse_vocabulary(vocabulary)
        return self.classes

    def segment(self, image) -> SegmentationResult:
        if not self.classes:
            raise ScanError("no vocabulary: call set_vocabulary first")
        pixels = as_rgb_array(image) if isinstance(image, np.ndarray) else load_image(image)
        names = np.array([[name.encode("utf-8") for name in self.classes]], dtype=np.object_)
        inputs = [self._module.InferInput("image", [1, *pixels.shape], "UINT8"),
                  self._module.InferInput("classes", list(names.shape), "BYTES")]
        inputs[0].set_data_from_numpy(pixels[None])
        inputs[1].set_data_from_numpy(names)
        start = time.perf_counter()
        try:
            answer = self._client.infer(self.model, inputs, outputs=[self._module.InferRequestedOutput(name)
                                                                      for name in ("labels", "scores", "error")])
        except self._module.InferenceServerException as exc:
            lines = [line for line in str(exc).splitlines() if line.strip()]
            mine = [line for line in lines if "ScanError:" in line]
            raise ScanError(f"the server refused the request: {(mine or lines or ['no message'])[-1].strip()}") from None
        error = answer.as_numpy("error")[0][0]
        if error:
            raise ScanError(f"the server refused the request: {error.decode('utf-8', 'replace')}")
        labels = answer.as_numpy("labels")[0].astype(np.int64)
        return SegmentationResult(labels, list(self.classes), None, {"server": time.perf_counter() - start},
                                  tuple(labels.shape), label_scores=answer.as_numpy("scores")[0])

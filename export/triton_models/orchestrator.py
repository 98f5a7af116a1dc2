"""The `scan` model of a repository written by `scan export --triton` (Triton Python backend, BLS).

Each request is answered by the runtime's `Segmenter` (copied beside this file, with the
bundle's manifest, tokenizer and text caches): pre-processing, valid-proposal selection and
post-processing in numpy here, the four graphs as the repository's piece models, called through
Triton's business-logic scripting (BLS). Requests and answers are `runtime.serve_requests`'s.
"""

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # this repository's copy of the runtime comes first

from runtime.errors import ScanError  # noqa: E402
from runtime.manifest import read_manifest  # noqa: E402
from runtime.segmenter import PIECE_NAMES, Segmenter  # noqa: E402
from runtime.serve_requests import INPUT_NAMES, RequestHandler, RequestLimits  # noqa: E402
from runtime.vocab import parse_vocabulary  # noqa: E402


class PieceModel:
    """A bundle piece served by another model of the repository: `run(feeds) -> outputs` over BLS."""

    def __init__(self, model: str, outputs: list[str]):
        self.model, self.outputs = model, outputs

    def run(self, feeds: dict) -> dict:
        # Scalars travel as one element: Triton's dims have no rank 0 (the config reshapes them back).
        inputs = [pb_utils.Tensor(name, np.ascontiguousarray(value).reshape(value.shape or (1,)))
                  for name, value in feeds.items()]
        request = pb_utils.InferenceRequest(model_name=self.model, requested_output_names=self.outputs, inputs=inputs)
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"piece model {self.model}: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in self.outputs}


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        manifest = read_manifest(HERE / "bundle")
        self.runners = {piece: PieceModel(self.parameters[f"{piece}_model"],
                                          [t.name for t in manifest.pieces[piece].variant(self.parameters["precision"]).outputs])
                        for piece in PIECE_NAMES}
        self.vocab = self.parameters.get("vocab") or None
        if self.vocab:
            parse_vocabulary(self.vocab)  # a bad default fails the load, not the first request
        self.handler = None  # made on the first request: the piece models may still be loading now

    def _handler(self) -> RequestHandler:
        if self.handler is None:
            segmenter = Segmenter(HERE / "bundle", precision=self.parameters["precision"],
                                  resize=self.parameters["resize"] == "true", runners=self.runners)
            limits = RequestLimits(int(self.parameters["max_classes"]), int(self.parameters["max_image_pixels"]))
            self.handler = RequestHandler(segmenter, self.vocab, limits)
        return self.handler

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                inputs = {}
                for name in INPUT_NAMES:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is not None:
                        inputs[name] = tensor.as_numpy()
                outputs = self._handler().answer(inputs, request.requested_output_names() or None)
                responses.append(pb_utils.InferenceResponse(
                    output_tensors=[pb_utils.Tensor(name, value) for name, value in outputs.items()]))
            except (ScanError, RuntimeError) as exc:  # a piece model failed: this request's error, not the batch's
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(exc))))
        return responses

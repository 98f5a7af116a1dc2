"""A bundle piece run inside Triton's Python backend (`--triton-backend python`).

For Triton builds that have only the Python backend (PyTriton's server, a CPU-only container);
where Triton's own ONNX Runtime or OpenVINO backend exists, `--triton-backend onnxruntime` or
`openvino` serves the same `model.onnx` without Python. The `engine` parameter picks what runs the
graph: ONNX Runtime, or OpenVINO through the runtime copy the repository's orchestrator carries
(`scan/1/runtime`), so that its native-BF16 check, bf16 fallback and compiled-model cache apply.
"""

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent


def _onnxruntime(threads: int, args):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    providers = ["CPUExecutionProvider"]
    if args.get("model_instance_kind") == "GPU" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers = [("CUDAExecutionProvider", {"device_id": int(args["model_instance_device_id"])}), *providers]
    session = ort.InferenceSession(str(HERE / "model.onnx"), options, providers=providers)
    outputs = [o.name for o in session.get_outputs()]
    return [i.name for i in session.get_inputs()], outputs, lambda feeds: dict(zip(outputs, session.run(outputs, feeds)))


def _openvino(threads: int, precision: str, sha256: str, name: str, quantised: bool, bf16_refused: bool):
    orchestrator = HERE.parents[1] / "scan" / "1"  # DIR/scan_<piece>/1 -> DIR/scan/1 (written together)
    if str(orchestrator) not in sys.path:
        sys.path.insert(0, str(orchestrator))
    from runtime.cpu import cpu_info
    from runtime.openvino_backend import OpenVinoRunner, compile_hint, resolve_precision

    cpu = cpu_info()
    precision, note = resolve_precision(precision, cpu)
    report = lambda line: print(f"{name}: {line}", file=sys.stderr, flush=True)  # noqa: E731
    if note:
        report(f"note: {note}")
    hint = compile_hint(precision, cpu, quantised, bf16_refused)
    runner = OpenVinoRunner(name, HERE / "model.onnx", sha256, hint, threads or None, cpu=cpu, report=report,
                            quantised=quantised)
    return runner.input_names, runner.output_names, runner.run


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        threads = int(parameters.get("threads", "0") or 0)
        if parameters.get("engine", "onnxruntime") == "openvino":
            self.inputs, self.outputs, self.run = _openvino(
                threads, parameters.get("precision", "fp32"), parameters.get("sha256", "unknown"), config["name"],
                parameters.get("quantised") == "true", parameters.get("bf16_refused") == "true")
        else:
            self.inputs, self.outputs, self.run = _onnxruntime(threads, args)

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs}
            values = self.run(feeds)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor(name, np.ascontiguousarray(values[name])) for name in self.outputs]))
        return responses

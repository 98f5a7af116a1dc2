"""From the eager model to deployable pieces: ONNX export of the four pieces, their parity and
pipeline gates, reduced-precision variants (fp16, int8), TensorRT engines, the bundle and its
Triton model repository."""

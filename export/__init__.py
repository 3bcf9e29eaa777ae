"""ganet.export: ONNX and TensorRT export with parity checks (issue 4 builds it)."""

"""ganet.export: ONNX and TensorRT export with parity checks."""

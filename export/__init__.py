"""Deployment: ONNX export and checks, TensorRT engine build, inference backends, the frame pipeline."""

"""ONNX export, INT8, TensorRT and latency measurement. Imports no Lightning."""

"""Measurements of a model: size (MACs, params), accuracy and drift, ONNX Runtime latency."""

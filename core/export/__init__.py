"""Artifacts of a run: the ONNX export (verified in ONNX Runtime) and the torch.export archive."""

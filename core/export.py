"""Artifacts: ONNX (verified in ONNX Runtime) and a torch.export archive (.pt2)."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.errors import ExportError
from core.metrics import logits_of

ONNX_RELATIVE_TOLERANCE = 1e-3


class _LogitsOnly(nn.Module):
    """Exports only the logits of models that return tuples or output objects."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(x))


def _exportable(model: nn.Module) -> nn.Module:
    """A CPU copy: exporting must not move the caller's model off its device."""
    return _LogitsOnly(copy.deepcopy(model).cpu()).eval()


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """ONNX with a dynamic batch axis. The TorchScript-based exporter is tried first (fast,
    robust with dynamic axes); the dynamo exporter is the fallback."""
    wrapped = _exportable(model)
    example = example.cpu()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapped, (example,), str(path), dynamo=False, opset_version=17,
                input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
    except Exception as legacy_error:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapped, (example,), str(path), dynamo=True, verbose=False,
                    input_names=["input"], output_names=["logits"],
                    dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}},
                )
        except Exception as dynamo_error:
            raise ExportError(
                f"ONNX export failed: {legacy_error.__class__.__name__}: {legacy_error}; "
                f"dynamo exporter: {dynamo_error.__class__.__name__}: {dynamo_error}"
            ) from dynamo_error


@torch.no_grad()
def verify_onnx(model: nn.Module, path: Path, inputs: torch.Tensor) -> float:
    """Max abs difference between PyTorch and ONNX Runtime on real inputs; raises past 1e-3 relative."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    reference = _exportable(model)(inputs.cpu()).numpy()
    got = session.run(None, {name: inputs.cpu().numpy()})[0]
    if got.shape != reference.shape:
        raise ExportError(f"ONNX output shape {got.shape} differs from PyTorch {reference.shape}.")
    max_abs = float(np.abs(got - reference).max())
    scale = float(np.abs(reference).max()) or 1.0
    if max_abs / scale > ONNX_RELATIVE_TOLERANCE:
        raise ExportError(
            f"ONNX Runtime disagrees with PyTorch: max abs diff {max_abs:.3g} "
            f"({max_abs / scale:.3g} relative, limit {ONNX_RELATIVE_TOLERANCE})."
        )
    return max_abs


@torch.no_grad()
def export_pt2(model: nn.Module, example: torch.Tensor, path: Path) -> str | None:
    """Write a torch.export archive and check it reloads to the same outputs.

    Returns None on success, or the reason torch.export could not capture the model
    (the other artifacts are still produced).
    """
    wrapped = _exportable(model)
    example = example.cpu()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.export(
                wrapped, (example,), dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1)}}
            )
            torch.export.save(program, str(path))
            reloaded = torch.export.load(str(path)).module()
        diff = float((reloaded(example) - wrapped(example)).abs().max())
    except Exception as exc:  # torch.export's failure modes are many; the reason goes in the report
        path.unlink(missing_ok=True)
        return f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if diff > 1e-4 * (float(wrapped(example).abs().max()) or 1.0):
        path.unlink(missing_ok=True)
        return f"reloaded .pt2 differs from the model (max abs diff {diff:.3g})"
    return None

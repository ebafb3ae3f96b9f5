"""Artifacts: ONNX (verified in ONNX Runtime) and a torch.export archive (.pt2)."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.errors import ExportError
from core.export.spec import ONNX_RELATIVE_TOLERANCE, OnnxSpec, onnx_input_dtype
from core.graph.tracing import logits_of


class _LogitsOnly(nn.Module):
    """Exports only the logits of models that return tuples or output objects."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_of(self.model(x))


class _CastInput(nn.Module):
    """Takes inputs in the dtype the original ONNX model declared and feeds the model its own dtype."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype))


def _exportable(model: nn.Module) -> nn.Module:
    """A CPU copy: exporting must not move the caller's model off its device."""
    return _LogitsOnly(copy.deepcopy(model).cpu()).eval()


def _dims(axes: dict[int, str]) -> dict[int, torch.export.Dim]:
    """torch.export dims for the dynamo exporter; one Dim per name, so equal names stay equal."""
    by_name: dict[str, torch.export.Dim] = {}
    for name in axes.values():
        # Dim names must be Python identifiers; ONNX dim_params can be anything ("batch size", "N+1")
        identifier = "d_" + re.sub(r"\W", "_", name)
        by_name.setdefault(name, torch.export.Dim(identifier, min=1))
    return {axis: by_name[name] for axis, name in axes.items()}


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, spec: OnnxSpec | None = None) -> None:
    """ONNX with the names, input dtype and dynamic axes of `spec` (default: input "input",
    output "logits", dynamic batch). The TorchScript-based exporter is tried first (fast,
    robust with dynamic axes); the dynamo exporter is the fallback."""
    spec = spec or OnnxSpec()
    input_name, output_name = spec.input_names[0], spec.output_names[0]
    wrapped = _exportable(model)
    example = example.cpu()
    dtype = getattr(torch, spec.input_dtypes.get(input_name, "float32"))
    if dtype != example.dtype:
        wrapped, example = _CastInput(wrapped, example.dtype), example.to(dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapped, (example,), str(path), dynamo=False, opset_version=17,
                input_names=[input_name], output_names=[output_name],
                dynamic_axes={input_name: spec.axes_of(input_name), output_name: spec.axes_of(output_name)},
            )
    except Exception as legacy_error:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapped, (example,), str(path), dynamo=True, verbose=False,
                    input_names=[input_name], output_names=[output_name],
                    dynamic_shapes={"x": _dims(spec.axes_of(input_name))},
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
    declared = session.get_inputs()[0]
    # the export may take another dtype than the data (the original ONNX model's); both sides see the same values
    feed = inputs.cpu().numpy().astype(onnx_input_dtype(declared.type))
    reference = _exportable(model)(torch.from_numpy(feed).to(inputs.dtype)).numpy()
    got = session.run(None, {declared.name: feed})[0]
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
def export_pt2(model: nn.Module, example: torch.Tensor, path: Path, spec: OnnxSpec | None = None) -> str | None:
    """Write a torch.export archive, dynamic along the axes `spec` declares for the input (the
    batch; a text model's sequence) where the model allows, and check it reloads to the same outputs.

    Returns None on success, or the reason torch.export could not capture the model
    (the other artifacts are still produced).
    """
    spec = spec or OnnxSpec()
    wrapped = _exportable(model)
    example = example.cpu()
    axes = spec.axes_of(spec.input_names[0])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # AUTO lets torch.export find each axis's range (a text model's sequence is bounded by its
            # position table) and keep an axis static where the model fixes it
            dynamic = {axis: torch.export.Dim.AUTO for axis in axes}
            program = torch.export.export(wrapped, (example,), dynamic_shapes={"x": dynamic})
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

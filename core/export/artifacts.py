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
from core.graph.outputs import named_outputs


class _Flattened(nn.Module):
    """Every output of the model as a flat tuple, in the order of core.graph.outputs.named_outputs: ONNX
    has named outputs, not nested ones, and a model's outputs are all part of its interface."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(named_outputs(self.model(x)).values())


class _CastInput(nn.Module):
    """Takes inputs in the dtype the original ONNX model declared and feeds the model its own dtype."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = model
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.to(self.dtype))


def _cpu_copy(model: nn.Module) -> nn.Module:
    """Exporting must not move the caller's model off its device."""
    return copy.deepcopy(model).cpu().eval()


def _exportable(model: nn.Module) -> nn.Module:
    return _Flattened(_cpu_copy(model)).eval()


@torch.no_grad()
def _output_names(model: nn.Module, example: torch.Tensor, spec: OnnxSpec | None) -> list[str]:
    """The ONNX names of the model's outputs: an ONNX upload's own, else their names in the model's output."""
    names = list(named_outputs(model(example)))
    if spec is None:
        return names
    if len(spec.output_names) != len(names):
        raise ExportError(f"The model has {len(names)} outputs where its ONNX interface declares "
                          f"{len(spec.output_names)} ({', '.join(spec.output_names)}).")
    return spec.output_names


def _dims(axes: dict[int, str]) -> dict[int, torch.export.Dim]:
    """torch.export dims for the dynamo exporter; one Dim per name, so equal names stay equal."""
    by_name: dict[str, torch.export.Dim] = {}
    for name in axes.values():
        # Dim names must be Python identifiers; ONNX dim_params can be anything ("batch size", "N+1")
        identifier = "d_" + re.sub(r"\W", "_", name)
        by_name.setdefault(name, torch.export.Dim(identifier, min=1))
    return {axis: by_name[name] for axis, name in axes.items()}


def export_onnx(model: nn.Module, example: torch.Tensor, path: Path, spec: OnnxSpec | None = None) -> None:
    """ONNX with the names, input dtype and dynamic axes of `spec` (default: input "input", dynamic
    batch), and every output of the model (named as in `spec`, else as core.graph.outputs names them).
    The TorchScript-based exporter is tried first (fast, robust with dynamic axes); the dynamo
    exporter is the fallback."""
    example = example.cpu()
    copied = _cpu_copy(model)
    output_names = _output_names(copied, example, spec)
    wrapped: nn.Module = _Flattened(copied).eval()
    spec = spec or OnnxSpec()
    input_name = spec.input_names[0]
    dtype = getattr(torch, spec.input_dtypes.get(input_name, "float32"))
    if dtype != example.dtype:
        wrapped, example = _CastInput(wrapped, example.dtype), example.to(dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapped, (example,), str(path), dynamo=False, opset_version=17,
                input_names=[input_name], output_names=output_names,
                dynamic_axes={name: spec.axes_of(name) for name in [input_name, *output_names]},
            )
    except Exception as legacy_error:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapped, (example,), str(path), dynamo=True, verbose=False,
                    input_names=[input_name], output_names=output_names,
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
    references = [output.numpy() for output in _exportable(model)(torch.from_numpy(feed).to(inputs.dtype))]
    results = session.run(None, {declared.name: feed})
    if len(results) != len(references):
        raise ExportError(f"The ONNX model has {len(results)} outputs where PyTorch has {len(references)}.")
    max_abs = 0.0
    for name, got, reference in zip((value.name for value in session.get_outputs()), results, references):
        if got.shape != reference.shape:
            raise ExportError(f"ONNX output {name!r} has shape {got.shape} where PyTorch gives {reference.shape}.")
        max_abs = max(max_abs, _relative_check(name, got, reference))
    return max_abs


def _relative_check(name: str, got: np.ndarray, reference: np.ndarray) -> float:
    """The max abs difference of one output; raises past ONNX_RELATIVE_TOLERANCE of the output's scale."""
    max_abs = float(np.abs(got - reference).max())
    scale = float(np.abs(reference).max()) or 1.0
    if max_abs / scale > ONNX_RELATIVE_TOLERANCE:
        raise ExportError(
            f"ONNX Runtime disagrees with PyTorch on {name!r}: max abs diff {max_abs:.3g} "
            f"({max_abs / scale:.3g} relative, limit {ONNX_RELATIVE_TOLERANCE})."
        )
    return max_abs


@torch.no_grad()
def export_pt2(model: nn.Module, example: torch.Tensor, path: Path, spec: OnnxSpec | None = None) -> str | None:
    """Write a torch.export archive of the model as it is (its outputs in their own structure), dynamic
    along the axes `spec` declares for the input (the batch; a text model's sequence) where the model
    allows, and check it reloads to the same outputs.

    Returns None on success, or the reason torch.export could not capture the model
    (the other artifacts are still produced).
    """
    spec = spec or OnnxSpec()
    copied = _cpu_copy(model)
    example = example.cpu()
    axes = spec.axes_of(spec.input_names[0])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # AUTO lets torch.export find each axis's range (a text model's sequence is bounded by its
            # position table) and keep an axis static where the model fixes it
            dynamic = {axis: torch.export.Dim.AUTO for axis in axes}
            program = torch.export.export(copied, (example,), dynamic_shapes=(dynamic,))
            torch.export.save(program, str(path))
            reloaded = torch.export.load(str(path)).module()
        expected = named_outputs(copied(example))
        got = named_outputs(reloaded(example))
        diff = max(float((got[name] - value).abs().max()) for name, value in expected.items())
    except Exception as exc:  # torch.export's failure modes are many; the reason goes in the report
        path.unlink(missing_ok=True)
        return f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if diff > 1e-4 * (max(float(value.abs().max()) for value in expected.values()) or 1.0):
        path.unlink(missing_ok=True)
        return f"reloaded .pt2 differs from the model (max abs diff {diff:.3g})"
    return None

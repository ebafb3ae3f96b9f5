"""Artifacts: ONNX (verified in ONNX Runtime) and a torch.export archive (.pt2)."""

from __future__ import annotations

import copy
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from core.errors import ExportError
from core.export.detections import detection_difference
from core.export.spec import ONNX_RELATIVE_TOLERANCE, OnnxSpec, ort_feed
from core.graph.detectors import one_image_per_call
from core.graph.outputs import named_outputs
from core.inputs import Inputs

# Images a one-image-per-call export (core.graph.detectors) is checked on, one ONNX Runtime run each.
PER_IMAGE_CHECKS = 8
DETECTOR_PT2_ERROR = ("torch.export cannot capture a detector's post-processing (non-maximum suppression keeps a "
                      "data-dependent number of boxes); use model.onnx")


class _Exportable(nn.Module):
    """The model as exported: its inputs taken positionally in the interface's order (what both
    exporters trace), each cast to the dtype the model takes where the interface declares another
    (an ONNX upload's), and every output: the one tensor of a single-output model, else a flat tuple in
    the order of core.graph.outputs.named_outputs (ONNX has named outputs, not nested ones, and a
    model's outputs are all part of its interface)."""

    def __init__(self, model: nn.Module, example: Inputs) -> None:
        super().__init__()
        self.model = model
        self.names = example.names
        self.positional = example.positional
        self.dtypes = [s.dtype for s in example.signature]

    def forward(self, *args: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        cast = [arg if arg.dtype == dtype else arg.to(dtype) for arg, dtype in zip(args, self.dtypes, strict=True)]
        # not through Inputs, whose check of the batch sizes would fix the traced batch axis
        output = self.model(*cast) if self.positional else self.model(**dict(zip(self.names, cast, strict=True)))
        flat = tuple(named_outputs(output).values())
        return flat[0] if len(flat) == 1 else flat


def _exportable(model: nn.Module, example: Inputs) -> _Exportable:
    """A CPU copy: exporting must not move the caller's model off its device."""
    return _Exportable(copy.deepcopy(model).cpu(), example).eval()


def _spec_for(example: Inputs, spec: OnnxSpec | None) -> OnnxSpec:
    return spec or OnnxSpec.of(example.signature)


def _declared(example: Inputs, spec: OnnxSpec) -> tuple[torch.Tensor, ...]:
    """The example's tensors on the CPU in the dtypes `spec` declares, in the interface's order."""
    return tuple(t.cpu().to(getattr(torch, spec.input_dtypes.get(name, str(t.dtype).removeprefix("torch."))))
                 for name, t in zip(spec.input_names, example.tensors.values(), strict=True))


@torch.no_grad()
def _output_names(wrapped: _Exportable, example: Inputs, spec: OnnxSpec | None) -> list[str]:
    """The ONNX names of the model's outputs: an ONNX upload's own, else their names in the model's output."""
    names = list(named_outputs(example.to("cpu").call(wrapped.model)))
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


def export_onnx(model: nn.Module, example: Inputs, path: Path, spec: OnnxSpec | None = None) -> None:
    """ONNX with the names, input dtypes and dynamic axes of `spec` (default: those the example's
    inputs call for, OnnxSpec.of), and every output of the model (named as in `spec`, else as
    core.graph.outputs names them). The TorchScript-based exporter is tried first (fast, robust
    with dynamic axes); the dynamo exporter is the fallback. A model that runs one image per call
    (core.graph.detectors) is exported for one image, with no dynamic axis."""
    per_image = one_image_per_call(model)
    if per_image:
        example = example[:1]
    wrapped = _exportable(model, example)
    output_names = _output_names(wrapped, example, spec)
    spec = _spec_for(example, spec)
    args = _declared(example, spec)
    axes = {} if per_image else {name: spec.axes_of(name) for name in [*spec.input_names, *output_names]}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapped, args, str(path), dynamo=False, opset_version=17,
                input_names=spec.input_names, output_names=output_names, dynamic_axes=axes,
            )
    except Exception as legacy_error:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    wrapped, args, str(path), dynamo=True, verbose=False,
                    input_names=spec.input_names, output_names=output_names,
                    dynamic_shapes=None if per_image else (tuple(_dims(axes[name]) for name in spec.input_names),),
                )
        except Exception as dynamo_error:
            raise ExportError(
                f"ONNX export failed: {legacy_error.__class__.__name__}: {legacy_error}; "
                f"dynamo exporter: {dynamo_error.__class__.__name__}: {dynamo_error}"
            ) from dynamo_error


@torch.no_grad()
def verify_onnx(model: nn.Module, path: Path, inputs: Inputs) -> float:
    """Max abs difference between PyTorch and ONNX Runtime on real inputs; raises past 1e-3 relative.
    A one-image-per-call export (a detector) is run on the first PER_IMAGE_CHECKS inputs, one at a
    time, and its detections compared up to the order of tied scores (core.export.detections)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    exportable = _exportable(model, inputs)
    if not one_image_per_call(model):
        return _compare(session, exportable, inputs, detections=False)
    return max(_compare(session, exportable, inputs[i : i + 1], detections=True)
               for i in range(min(len(inputs), PER_IMAGE_CHECKS)))


def _compare(session: Any, exportable: _Exportable, inputs: Inputs, detections: bool) -> float:
    """verify_onnx on one batch that `session` (an ONNX Runtime session of the export) can take."""
    # the export may take other dtypes than the data (the original ONNX model's); both sides see the same values
    feed = ort_feed(session.get_inputs(), inputs)
    exported = exportable(*(torch.from_numpy(array) for array in feed.values()))
    references = [output.numpy() for output in named_outputs(exported).values()]
    results = session.run(None, feed)
    if len(results) != len(references):
        raise ExportError(f"The ONNX model has {len(results)} outputs where PyTorch has {len(references)}.")
    names = [value.name for value in session.get_outputs()]
    for name, got, reference in zip(names, results, references):
        if got.shape != reference.shape:
            raise ExportError(f"ONNX output {name!r} has shape {got.shape} where PyTorch gives {reference.shape}.")
    if detections:
        return detection_difference(dict(zip(names, references)), dict(zip(names, results)))
    return max(_relative_check(name, got, reference) for name, got, reference in zip(names, results, references))


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
def export_pt2(model: nn.Module, example: Inputs, path: Path, spec: OnnxSpec | None = None) -> str | None:
    """Write a torch.export archive (every output, as _Exportable returns them), dynamic along the
    axes `spec` declares for each input (the batch; a text model's sequence) where the model allows,
    and check it reloads to the same outputs.

    Returns None on success, or the reason torch.export could not capture the model
    (the other artifacts are still produced). A detector (core.graph.detectors) is not tried:
    its post-processing (score thresholds, non-maximum suppression) sizes tensors by their values,
    which torch.export refuses, after tens of seconds and pages of log.
    """
    if one_image_per_call(model):
        return DETECTOR_PT2_ERROR
    spec = _spec_for(example, spec)
    wrapped = _exportable(model, example)
    args = _declared(example, spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # AUTO lets torch.export find each axis's range (a text model's sequence is bounded by its
            # position table) and keep an axis static where the model fixes it
            dynamic = tuple({axis: torch.export.Dim.AUTO for axis in spec.axes_of(name)} for name in spec.input_names)
            # one entry, the tuple of *args: _Exportable takes the inputs positionally
            program = torch.export.export(wrapped, args, dynamic_shapes=(dynamic,))
            torch.export.save(program, str(path))
            reloaded = torch.export.load(str(path)).module()
        expected = list(named_outputs(wrapped(*args)).values())
        got = named_outputs(reloaded(*args)).values()
        diff = max(float((value - reference).abs().max()) for value, reference in zip(got, expected, strict=True))
    except Exception as exc:  # torch.export's failure modes are many; the reason goes in the report
        path.unlink(missing_ok=True)
        return f"{exc.__class__.__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    if diff > 1e-4 * (max(float(value.abs().max()) for value in expected) or 1.0):
        path.unlink(missing_ok=True)
        return f"reloaded .pt2 differs from the model (max abs diff {diff:.3g})"
    return None

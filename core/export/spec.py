"""The interface of an ONNX model (input and output names, input dtypes, dynamic axes): what an
ONNX upload declares, or what the data's inputs call for; what the pruned model is exported and
checked with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from core.inputs import Inputs, Signature

ONNX_RELATIVE_TOLERANCE = 1e-3
BATCH_AXIS_NAME = "batch"
SEQUENCE_AXIS_NAME = "sequence"
# the input name of a single-input export, which clients of earlier exports feed
SINGLE_INPUT_NAME = "input"


@dataclass
class OnnxSpec:
    """The interface of an ONNX model: what the pruned model is exported with.

    `dynamic_axes` maps an input or output name to {axis index: symbolic name}; `input_dtypes`
    maps input names to numpy dtype names. The default is the interface of our own exports.
    """

    input_names: list[str] = field(default_factory=lambda: ["input"])
    output_names: list[str] = field(default_factory=lambda: ["logits"])
    dynamic_axes: dict[str, dict[int, str]] = field(
        default_factory=lambda: {"input": {0: BATCH_AXIS_NAME}, "logits": {0: BATCH_AXIS_NAME}})
    input_dtypes: dict[str, str] = field(default_factory=lambda: {"input": "float32"})

    @classmethod
    def of(cls, signature: list[Signature]) -> OnnxSpec:
        """The interface for inputs with `signature`: their names (a single input keeps "input"), their
        dtypes, a dynamic batch axis, and a dynamic sequence axis for token ids and masks."""
        names = [SINGLE_INPUT_NAME] if len(signature) == 1 else [s.name for s in signature]
        axes = {name: {0: BATCH_AXIS_NAME} | ({1: SEQUENCE_AXIS_NAME} if s.is_sequence else {})
                for name, s in zip(names, signature)}
        return cls(input_names=names, output_names=["logits"], dynamic_axes=axes | {"logits": {0: BATCH_AXIS_NAME}},
                   input_dtypes={name: s.dtype_name for name, s in zip(names, signature)})

    def axes_of(self, name: str) -> dict[int, str]:
        """Dynamic axes of `name`; the batch axis is always among them, since the pipeline
        verifies and times the export at several batch sizes."""
        axes = dict(self.dynamic_axes.get(name, {}))
        axes.setdefault(0, BATCH_AXIS_NAME)
        return axes


def ort_feed(declared: list[Any], inputs: Inputs) -> dict[str, np.ndarray]:
    """An ONNX Runtime feed: `inputs` in order under the session's input names (`declared`, its
    get_inputs()), each in the dtype the session declares."""
    return {arg.name: array.astype(onnx_input_dtype(arg.type))
            for arg, array in zip(declared, inputs.numpy().values(), strict=True)}


def onnx_input_dtype(ort_type: str) -> np.dtype:
    """The numpy dtype of an ONNX Runtime type string such as "tensor(float)"."""
    import onnx

    name = ort_type.removeprefix("tensor(").removesuffix(")").upper()
    return onnx.helper.tensor_dtype_to_np_dtype(getattr(onnx.TensorProto, name))

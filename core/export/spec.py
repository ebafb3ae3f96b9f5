"""The interface of an ONNX model (input and output names, input dtype, dynamic axes): what an
ONNX upload declares, and what the pruned model is exported and checked with."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

ONNX_RELATIVE_TOLERANCE = 1e-3
BATCH_AXIS_NAME = "batch"


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

    def axes_of(self, name: str) -> dict[int, str]:
        """Dynamic axes of `name`; the batch axis is always among them, since the pipeline
        verifies and times the export at several batch sizes."""
        axes = dict(self.dynamic_axes.get(name, {}))
        axes.setdefault(0, BATCH_AXIS_NAME)
        return axes


def onnx_input_dtype(ort_type: str) -> np.dtype:
    """The numpy dtype of an ONNX Runtime type string such as "tensor(float)"."""
    import onnx

    name = ort_type.removeprefix("tensor(").removesuffix(")").upper()
    return onnx.helper.tensor_dtype_to_np_dtype(getattr(onnx.TensorProto, name))

"""A model as intake hands it to `compress`, with what its file format tells about its inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from core.export.spec import OnnxSpec
from core.inputs import Inputs


@dataclass
class LoadedModel:
    """A model ready for `compress`, and what its format tells about its inputs."""

    module: nn.Module
    format: str  # onnx | safetensors | hf | pickle | factory
    # One input batch the model accepts (two samples), when the format says what inputs look like.
    example: Inputs | None = None
    tokenizer: Any = None
    onnx_spec: OnnxSpec | None = None  # of an ONNX upload: the export keeps its names and axes
    label_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def input_channels(self) -> int | None:
        first = next((m for m in self.module.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
        return None if first is None else first.in_channels

"""A model as intake hands it to `compress`, with what its file format tells about its inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from core.data import Dataset
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
    # text data becomes windows of tokens (a causal language model), not one padded row per record
    text_windows: bool = False
    onnx_spec: OnnxSpec | None = None  # of an ONNX upload: the export keeps its names and axes
    # the names the data calls the inputs -> the forward parameters they feed (an ONNX upload's input names)
    input_aliases: dict[str, str] = field(default_factory=dict)
    label_names: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    def bind(self, data: Dataset) -> Dataset:
        """`data` named and ordered as the module takes it; DataError names the inputs as the data does."""
        return data.bound(self.module, self.input_aliases)

    @property
    def input_channels(self) -> int | None:
        first = next((m for m in self.module.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
        return None if first is None else first.in_channels

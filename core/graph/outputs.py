"""A model's outputs as named tensors, whatever structure the model returns them in (a tensor, a
tuple or list, a dict or a Hugging Face ModelOutput), and the one among them that holds the
class logits: what the method measures accuracy and distils on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from core.errors import OptionsError

# The name of a model's only output when it returns a bare tensor: the name our exports always gave it.
SINGLE_OUTPUT = "logits"


def named_outputs(output: Any) -> dict[str, torch.Tensor]:
    """Every tensor of `output` by name, in order: dict keys (nested as "outer.inner"), positions in a
    tuple or list ("output_0", ..., or "outer.0" when nested); values that are not tensors (a ModelOutput's
    unset fields, scalars) are not outputs."""
    found: dict[str, torch.Tensor] = {}

    def visit(value: Any, name: str) -> None:
        if isinstance(value, torch.Tensor):
            found[name or SINGLE_OUTPUT] = value
        elif isinstance(value, Mapping):
            for key, item in value.items():
                visit(item, f"{name}.{key}" if name else str(key))
        elif isinstance(value, (tuple, list)):
            for index, item in enumerate(value):
                visit(item, f"{name}.{index}" if name else f"output_{index}")

    visit(output, "")
    return found


def select_output(output: Any, name: str | None) -> torch.Tensor:
    """The output named `name`, or without a name the classification head: the output itself when it
    is a tensor, its `logits` entry when it has one (a ModelOutput), else its first tensor."""
    if name is None:
        if isinstance(output, torch.Tensor):
            return output
        if isinstance(output, Mapping) and isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
    outputs = named_outputs(output)
    if name is None:
        if not outputs:
            raise OptionsError(f"The model returned no tensor (got a {type(output).__name__}).",
                               hint="Compress a model that returns its logits.", code="no_model_output")
        return next(iter(outputs.values()))
    if name not in outputs:
        raise OptionsError(
            f"The model has no output named {name!r}; its outputs are {', '.join(outputs) or 'none'}.",
            hint="Name the output that holds the class logits with --output (config output), or leave it unset "
                 "for the first one.",
            code="unknown_output",
        )
    return outputs[name]

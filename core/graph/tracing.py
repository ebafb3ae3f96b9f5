"""Forward passes: which container modules ran, in order, with their shapes."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from core.inputs import Inputs


@dataclass(frozen=True)
class ContainerCall:
    name: str
    input_shape: torch.Size | None  # of the first positional input, when it is a tensor
    output_shape: torch.Size | None  # when the output is a tensor


def containers_called_once(model: nn.Module, example: Inputs) -> list[ContainerCall]:
    """Submodules that have children and ran exactly once, in execution order.

    A module that runs twice is shared between places, so it can be neither a removable
    block nor a well-defined feature point.
    """
    calls: dict[str, list[ContainerCall]] = {}
    handles = []
    for name, module in model.named_modules():
        if not name or not any(True for _ in module.children()):
            continue

        def hook(_m: nn.Module, inputs: tuple, output: object, name: str = name) -> None:
            first = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
            calls.setdefault(name, []).append(ContainerCall(
                name,
                None if first is None else first.shape,
                output.shape if isinstance(output, torch.Tensor) else None,
            ))

        handles.append(module.register_forward_hook(hook))
    forward_once(model, example, handles)
    return [records[0] for records in calls.values() if len(records) == 1]


def forward_once(model: nn.Module, example: Inputs, handles: list[RemovableHandle]) -> None:
    """One eval-mode, no-grad forward pass for the hooks in `handles`, which are removed after."""
    model.eval()
    try:
        with torch.no_grad():
            example.call(model)
    finally:
        for handle in handles:
            handle.remove()

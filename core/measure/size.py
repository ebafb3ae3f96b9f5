"""Model size: multiply-accumulates and parameters, as the size target counts them."""

from __future__ import annotations

from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from core.inputs import Inputs
from core.modes import evaluating


class _Positional(nn.Module):
    """`model` taking the inputs positionally: torch-pruning's counter reads the batch size from the
    first positional input (and prints a warning to stdout when there is none)."""

    def __init__(self, model: nn.Module, example: Inputs) -> None:
        super().__init__()
        self.model = model
        self.names = example.names
        self.positional = example.positional

    def forward(self, *args: torch.Tensor) -> Any:
        return Inputs(dict(zip(self.names, args, strict=True)), self.positional).call(self.model)


def count_macs_params(model: nn.Module, example: Inputs) -> tuple[int, int]:
    """Multiply-accumulates for one sample, and the parameter count."""
    one = example[:1]
    with evaluating(model), torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(_Positional(model, one), tuple(one.tensors.values()))
    return int(macs), int(params)

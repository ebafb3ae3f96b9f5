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


def _subclass_counters(model: nn.Module) -> dict[type, Any]:
    """Counters for the layers whose class derives from one torch-pruning counts (EfficientNet's
    Conv2dStaticSamePadding is an nn.Conv2d): the counter matches classes exactly, and would count
    such a model's convolutions as no work at all."""
    known = tp.utils.op_counter.MODULES_MAPPING
    counters = {}
    for module in model.modules():
        kind = type(module)
        base = next((b for b in kind.__mro__[1:] if b in known), None) if kind not in known else None
        if base is not None:
            counters[kind] = known[base]
    return counters


def count_macs_params(model: nn.Module, example: Inputs) -> tuple[int, int]:
    """Multiply-accumulates for one sample, and the parameter count."""
    one = example[:1]
    # the counter reads this module global and clears it when it is done
    tp.utils.op_counter.CUSTOM_MODULES_MAPPING = _subclass_counters(model)
    with evaluating(model), torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(_Positional(model, one), tuple(one.tensors.values()))
    return int(macs), int(params)

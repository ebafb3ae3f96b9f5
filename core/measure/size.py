"""Model size: multiply-accumulates and parameters, as the size target counts them."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn


def count_macs_params(model: nn.Module, example: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates for one sample, and the parameter count."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example[:1])
    model.train(was_training)
    return int(macs), int(params)

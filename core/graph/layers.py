"""Layer kinds: which layers mix their input channels densely, so that each output is a linear
function of every input channel (what least-squares compensation refits, core.surgery.compensation)."""

from __future__ import annotations

from torch import nn

DenseLayer = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d


def mixes_densely(layer: nn.Module) -> bool:
    """A Linear, or a convolution that is neither grouped (depthwise) nor transposed."""
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d) and layer.groups == 1

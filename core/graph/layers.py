"""Layer kinds: which layers mix their input channels densely, so that each output is a linear
function of every input channel (what least-squares compensation refits, core.surgery.compensation),
and which of those compensation may fold a constant into."""

from __future__ import annotations

from torch import nn

DenseLayer = nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d


def mixes_densely(layer: nn.Module) -> bool:
    """A Linear, or a convolution that is neither grouped (depthwise) nor transposed."""
    if isinstance(layer, nn.Linear):
        return True
    return isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d) and layer.groups == 1


def compensates(layer: nn.Module) -> bool:
    """Whether compensation may make up in `layer` for inputs it loses: a dense layer with a bias to fold
    their mean into. A Linear must have one (Llama's projections have none, and giving them one would
    change the architecture a user exported); a convolution is given one if it lacks it (the BatchNorm
    that then follows it absorbs it in training)."""
    return mixes_densely(layer) and (getattr(layer, "bias", None) is not None or not isinstance(layer, nn.Linear))

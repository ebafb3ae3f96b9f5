"""A model in eval mode for a moment: checks and measurements on the model itself must not move its
BatchNorm statistics nor draw dropout masks, and must leave it in the mode the caller had it in."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(training)

"""Shapes in a converted graph: what a reshape did on an example, and the shape-free op that does the
same for any batch, sequence length and number of heads."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.fx as fx
from torch import nn

from core.inputs import Inputs

Shapes = tuple[torch.Size, torch.Size]  # a node's first input's shape and its output's


@torch.no_grad()
def shapes_at(module: fx.GraphModule, nodes: list[fx.Node], example: Inputs) -> dict[str, Shapes]:
    """Input and output shapes of each of the `nodes` (call_module), from one forward pass on `example`."""
    shapes: dict[str, Shapes] = {}

    def record(name: str) -> Callable[[nn.Module, tuple, torch.Tensor], None]:
        def hook(_module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            shapes.setdefault(name, (inputs[0].shape, output.shape))
        return hook

    handles = [module.get_submodule(str(node.target)).register_forward_hook(record(node.name)) for node in nodes]
    try:
        example.call(module.eval())
    finally:
        for handle in handles:
            handle.remove()
    return shapes


def flatten_start(before: torch.Size, after: torch.Size) -> int | None:
    """k such that `after` is `before` with the axes from k on folded into one, or None."""
    if len(after) > len(before):
        return None
    start = len(after) - 1
    # the longest common prefix keeps channels apart when the trailing axes are 1 ([N, C, 1, 1] -> [N, C, 1])
    if list(before[:start]) != list(after[:start]) or after[start] != math.prod(before[start:]):
        return None
    return start


def split_size(before: torch.Size, after: torch.Size) -> int | None:
    """d such that `after` is `before` with its last axis split into (-1, d) (channels into heads × head
    size), or None."""
    if len(after) != len(before) + 1 or list(before[:-1]) != list(after[:-2]):
        return None
    return int(after[-1]) if after[-2] * after[-1] == before[-1] else None


def shape_free(before: torch.Size, after: torch.Size) -> tuple[Callable[..., torch.Tensor], tuple] | None:
    """A function and its extra arguments that reshape like this for any leading sizes and any
    multiple of the kept trailing size, or None when the reshape is neither a fold of trailing axes
    nor a split of the last axis."""
    start = flatten_start(before, after)
    if start is not None:
        return torch.flatten, (start,)
    size = split_size(before, after)
    if size is not None:
        return torch.unflatten, (-1, (-1, size))
    return None

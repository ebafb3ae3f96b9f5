"""The layers that produce a model's outputs: a classifier's last Linear, a segmenter's per-class
convolutions (FCN's main and auxiliary heads), a detector's class, box and anchor predictors. Their
output channels are the model's interface (classes, anchors, box coordinates), never pruned."""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.graph import Node

from core.graph.outputs import named_outputs
from core.inputs import Inputs
from core.modes import evaluating

_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)
# A layer norm ends the walk: behind it is a transformer's residual stream, written by every layer's output
# projection, whose width (the hidden size) the groups' own check keeps where an output depends on it;
# counting those writers as output layers would also freeze the attention heads and MLPs they read.
_NORMALISED = ("NativeLayerNormBackward",)


def output_layers(model: nn.Module, example: Inputs) -> list[str]:
    """Conv/Linear layers whose output reaches a model output with no other Conv/Linear in between,
    in execution order: found by walking the autograd graph back from every output, so it sees
    through reshapes, softmax, box decoding and detection post-processing alike, but not through a
    layer norm (_NORMALISED). A path the model detaches (a detector's proposals) is no output's.

    Falls back to the last layer executed when no output depends on a layer through autograd."""
    produced: dict[Node, str] = {}
    executed: list[str] = []

    def hook(_module: nn.Module, _inputs: tuple, output: object, name: str) -> None:
        executed.append(name)
        if isinstance(output, torch.Tensor) and output.grad_fn is not None:
            produced[output.grad_fn] = name

    handles = [module.register_forward_hook(lambda m, i, o, name=name: hook(m, i, o, name))
               for name, module in model.named_modules() if isinstance(module, _LAYERS)]
    try:
        with evaluating(model), torch.enable_grad():
            outputs = named_outputs(example.call(model))
    finally:
        for handle in handles:
            handle.remove()
    found = _reached(produced, [t.grad_fn for t in outputs.values() if t.grad_fn is not None])
    if not found:
        return executed[-1:]
    return [name for name in dict.fromkeys(executed) if name in found]


def _reached(produced: dict[Node, str], roots: list[Node]) -> set[str]:
    """Names in `produced` whose autograd node is reachable from `roots` without passing another."""
    found: set[str] = set()
    seen: set[Node] = set()
    stack: list[Node | None] = list(roots)
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if node in produced:
            found.add(produced[node])
            continue
        if type(node).__name__.startswith(_NORMALISED):
            continue
        stack.extend(parent for parent, _ in node.next_functions)
    return found

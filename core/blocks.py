"""Stage 2 candidates: blocks whose removal keeps every shape valid (method §4).

A block qualifies when its forward adds its own input (identity shortcut) or the
output of one of its submodules applied to its input (projection shortcut) on the way
to its output. The check traces each block with torch.fx, so it works for any
residual block written in plain PyTorch, not only the ones we know by name.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

_ADDS = {operator.add, operator.iadd, torch.add}
_PASS_THROUGH_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Identity, nn.Dropout)
_PASS_THROUGH_FUNCTIONS = {torch.relu, nn.functional.relu, nn.functional.relu6, nn.functional.silu,
                           nn.functional.gelu, nn.functional.hardswish}


@dataclass(frozen=True)
class BlockCandidate:
    name: str
    shortcut: str | None  # submodule of the block to keep in its place; None = identity

    @property
    def kind(self) -> str:
        return "identity" if self.shortcut is None else "projection"


def _output_add(graph: fx.Graph, root: fx.GraphModule) -> fx.Node | None:
    """The addition that produces the block output, looking through trailing activations."""
    out = next(n for n in graph.nodes if n.op == "output")
    node = out.args[0]
    while isinstance(node, fx.Node):
        if node.op == "call_function" and node.target in _ADDS:
            return node
        if node.op == "call_method" and node.target in ("add", "add_"):
            return node
        passes = (
            (node.op == "call_module" and isinstance(root.get_submodule(node.target), _PASS_THROUGH_MODULES))
            or (node.op == "call_function" and node.target in _PASS_THROUGH_FUNCTIONS)
            or (node.op == "call_method" and node.target in ("relu", "relu_"))
        )
        if not passes:
            return None
        node = node.args[0]
    return None


def _shortcut_of(block: nn.Module) -> tuple[bool, str | None] | None:
    """(True, None) for an identity shortcut, (True, name) for a projection, None otherwise."""
    try:
        traced = fx.symbolic_trace(block)
    except Exception:  # untraceable blocks are simply not candidates
        return None
    placeholders = [n for n in traced.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        return None
    add = _output_add(traced.graph, traced)
    if add is None:
        return None
    operands = [a for a in add.args[:2] if isinstance(a, fx.Node)]
    if len(operands) != 2:
        return None
    (x,) = placeholders
    if x in operands:
        return True, None
    for node in operands:
        shortcut = _projection_of(node, x)
        if shortcut is not None:
            return True, shortcut
    return None


def _projection_of(node: fx.Node, x: fx.Node) -> str | None:
    """The submodule that computes `node` from `x` alone, if `node` is such a chain.

    fx inlines nn.Sequential, so a `downsample = Sequential(conv, bn)` shows up as the
    chain downsample.0 -> downsample.1; the projection is their common parent.
    """
    targets = []
    while isinstance(node, fx.Node) and node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
        targets.append(str(node.target))
        node = node.args[0]
        if node is x:
            break
    if node is not x or not targets:
        return None
    if len(targets) == 1:
        return targets[0]
    parents = [t.rsplit(".", 1)[0] if "." in t else "" for t in targets]
    if len(set(parents)) != 1 or not parents[0]:
        return None
    return parents[0]


def find_blocks(model: nn.Module, example: torch.Tensor) -> list[BlockCandidate]:
    """Residual blocks, in execution order, that can be replaced without breaking shapes."""
    calls: dict[str, int] = {}
    shapes: dict[str, tuple[torch.Size, torch.Size]] = {}
    order: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if not name or not any(True for _ in module.children()):
            continue

        def hook(_m, inputs, output, name=name):
            calls[name] = calls.get(name, 0) + 1
            if calls[name] == 1:
                order.append(name)
            if inputs and isinstance(inputs[0], torch.Tensor) and isinstance(output, torch.Tensor):
                shapes[name] = (inputs[0].shape, output.shape)

        handles.append(module.register_forward_hook(hook))
    model.eval()
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()

    candidates = []
    for name in order:
        if calls[name] != 1 or name not in shapes:
            continue
        found = _shortcut_of(model.get_submodule(name))
        if found is None:
            continue
        _, shortcut = found
        in_shape, out_shape = shapes[name]
        if shortcut is None and in_shape != out_shape:
            continue
        candidates.append(BlockCandidate(name, shortcut))
    return candidates


def remove_block(model: nn.Module, candidate: BlockCandidate) -> None:
    """Replace the block by Identity or by its shortcut projection, in place."""
    parent_name, _, child = candidate.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    block = parent.get_submodule(child)
    replacement = nn.Identity() if candidate.shortcut is None else block.get_submodule(candidate.shortcut)
    setattr(parent, child, replacement)

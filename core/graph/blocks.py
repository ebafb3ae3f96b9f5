"""Stage 2 candidates: blocks whose removal keeps every shape valid (method §4).

A block qualifies when its forward adds its own input (identity shortcut) or the
output of one of its submodules applied to its input (projection shortcut) on the way
to its output. The check traces each block with torch.fx, so it works for any
residual block written in plain PyTorch, not only the ones we know by name.

A flat graph (a model converted from ONNX) has no block submodules; there a block is the branch
of a residual `Addition` that only the addition uses and that reads only the addition's other
operand (the skip): removing it passes the skip through in the addition's place.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from core.graph.attention import holds_attention
from core.graph.tracing import ContainerCall, containers_called_once, forward_once
from core.inputs import Inputs

_ADDS = {operator.add, operator.iadd, torch.add}
_PASS_THROUGH_MODULES = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Identity, nn.Dropout)
_PASS_THROUGH_FUNCTIONS = {torch.relu, nn.functional.relu, nn.functional.relu6, nn.functional.silu,
                           nn.functional.gelu, nn.functional.hardswish}


@dataclass(frozen=True)
class BlockCandidate:
    name: str
    shortcut: str | None  # submodule of the block to keep in its place; None = identity
    layer: bool = False  # a transformer layer: skipped as a whole, its residual stream passed through
    # in a flat graph: `name` is a residual Addition and this the position of its skip operand
    skip: int | None = None

    @property
    def kind(self) -> str:
        if self.layer:
            return "layer"
        return "identity" if self.shortcut is None else "projection"


class Addition(nn.Module):
    """The sum of two computed tensors in a flat graph. Intake makes one of each such ONNX Add so that
    Stage 2 can find residual additions, score them with hooks and bypass them."""

    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return torch.add(first, second)


class SkippedLayer(nn.Module):
    """Stands in for a removed transformer layer: returns the hidden states it is given, whatever
    else the caller passes (masks, caches)."""

    def forward(self, hidden_states: torch.Tensor, *_args: object, **_kwargs: object) -> torch.Tensor:
        return hidden_states


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
            (node.op == "call_module" and isinstance(root.get_submodule(str(node.target)), _PASS_THROUGH_MODULES))
            or (node.op == "call_function" and node.target in _PASS_THROUGH_FUNCTIONS)
            or (node.op == "call_method" and node.target in ("relu", "relu_"))
        )
        if not passes:
            return None
        node = node.args[0]
    return None


def _candidate(name: str, block: nn.Module) -> BlockCandidate | None:
    """A candidate if `block` adds its input, or a projection of it, into its output."""
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
        return BlockCandidate(name, None)
    for node in operands:
        shortcut = _projection_of(node, x)
        if shortcut is not None:
            return BlockCandidate(name, shortcut)
    return None


def _projection_of(node: fx.Node, x: fx.Node) -> str | None:
    """The submodule that computes `node` from `x` alone, if `node` is such a chain.

    fx inlines nn.Sequential, so a `downsample = Sequential(conv, bn)` shows up as the
    chain downsample.0 -> downsample.1; the projection is their common parent.
    """
    targets = []
    current: fx.node.Argument = node  # walks up the chain: any argument of the last node seen
    while isinstance(current, fx.Node) and current.op == "call_module" and len(current.args) == 1 \
            and not current.kwargs:
        targets.append(str(current.target))
        current = current.args[0]
        if current is x:
            break
    if current is not x or not targets:
        return None
    if len(targets) == 1:
        return targets[0]
    parents = [t.rsplit(".", 1)[0] if "." in t else "" for t in targets]
    if len(set(parents)) != 1 or not parents[0]:
        return None
    return parents[0]


def find_blocks(model: nn.Module, example: Inputs) -> list[BlockCandidate]:
    """Residual blocks and transformer layers, in execution order, that can be replaced without
    breaking shapes."""
    calls = containers_called_once(model, example)
    layers = _transformer_layers(model, calls)
    inside_layer = tuple(name + "." for name in layers)
    candidates = []
    for call in calls:
        if call.name in layers:
            candidates.append(BlockCandidate(call.name, None, layer=True))
            continue
        if call.name.startswith(inside_layer):
            continue  # a layer is removed as a whole, not piecewise

        if call.input_shape is None or call.output_shape is None:
            continue
        candidate = _candidate(call.name, model.get_submodule(call.name))
        if candidate is None:
            continue
        if candidate.shortcut is None and call.input_shape != call.output_shape:
            continue
        # fx inlines non-torch containers, so a stage holding a single residual block looks
        # residual too; keep the innermost block (hooks fire inner-first) so each is listed once
        if any(c.name.startswith(call.name + ".") for c in candidates):
            continue
        candidates.append(candidate)
    if isinstance(model, fx.GraphModule):
        candidates += _residual_additions(model, example)
    return candidates


def _residual_additions(model: fx.GraphModule, example: Inputs) -> list[BlockCandidate]:
    """The graph's residual Additions whose branch can go, in graph order; of nested ones the innermost."""
    nodes = list(model.graph.nodes)
    additions = [node for node in nodes
                 if node.op == "call_module" and isinstance(model.get_submodule(str(node.target)), Addition)]
    if not additions:
        return []
    shapes = _addition_shapes(model, example)
    found: dict[fx.Node, tuple[int, set[fx.Node]]] = {}
    for node in additions:
        recorded = shapes.get(str(node.target))
        if recorded is None:
            continue
        for skip in (1, 0):
            branch = _branch(model, nodes, node, skip)
            if branch is not None and recorded[skip] == recorded[2]:
                found[node] = skip, branch
                break
    return [BlockCandidate(str(node.target), None, skip=skip) for node, (skip, branch) in found.items()
            if not any(other in branch for other in found)]


def _addition_shapes(model: fx.GraphModule, example: Inputs) -> dict[str, tuple[torch.Size, ...]]:
    """Each Addition's operand shapes and output shape, for the ones that ran exactly once."""
    seen: dict[str, list[tuple[torch.Size, ...]]] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, Addition):
            def hook(_m: nn.Module, inputs: tuple, output: torch.Tensor, name: str = name) -> None:
                seen.setdefault(name, []).append((inputs[0].shape, inputs[1].shape, output.shape))
            handles.append(module.register_forward_hook(hook))
    forward_once(model, example, handles)
    return {name: records[0] for name, records in seen.items() if len(records) == 1}


def _branch(model: fx.GraphModule, nodes: list[fx.Node], addition: fx.Node, skip: int) -> set[fx.Node] | None:
    """The nodes that compute the Addition's non-skip operand and feed nothing else, when they read the
    skip operand, nothing else computed, and hold a layer with parameters; else None. `nodes` are the
    graph's, in order."""
    if len(addition.args) != 2 or addition.kwargs:
        return None
    x, operand = addition.args[skip], addition.args[1 - skip]
    if not isinstance(x, fx.Node) or not isinstance(operand, fx.Node) or operand is x:
        return None
    branch = {operand}
    # graph order is topological: walking back from the operand, a node joins once all its users have
    for node in reversed(nodes[:nodes.index(operand)]):
        if node is not x and node.op != "placeholder" and node.users \
                and all(user in branch or user is addition for user in node.users):
            branch.add(node)
    reads = {arg for node in branch for arg in node.all_input_nodes if arg not in branch}
    if x not in reads or any(arg is not x and arg.op != "get_attr" for arg in reads):
        return None
    layers = [model.get_submodule(str(node.target)) for node in branch if node.op == "call_module"]
    return branch if any(True for layer in layers for _ in layer.parameters()) else None


def _transformer_layers(model: nn.Module, calls: list[ContainerCall]) -> set[str]:
    """Shape-preserving layers that hold attention and repeat in a stack (encoder layers, ViT and
    Swin blocks): removing one leaves the residual stream as it was, so each is a Stage 2 candidate."""
    shapes = {call.name: call for call in calls}
    layers = set()
    for stack_name, stack in model.named_modules():
        if not isinstance(stack, (nn.ModuleList, nn.Sequential)):
            continue
        children = list(stack.named_children())
        for child_name, child in children:
            name = f"{stack_name}.{child_name}" if stack_name else child_name
            call = shapes.get(name)
            if call is None or call.input_shape is None or call.input_shape != call.output_shape:
                continue
            siblings = sum(type(other) is type(child) for _, other in children)
            if siblings >= 2 and holds_attention(child):
                layers.add(name)
    # a layer goes as a whole: stacks nested inside another layer (MaxViT's window and grid
    # attention inside a MaxViT layer) are not candidates of their own
    return {name for name in layers if not any(name.startswith(outer + ".") for outer in layers)}


def remove_block(model: nn.Module, candidate: BlockCandidate) -> None:
    """Replace the block by Identity, by its shortcut projection, or (a layer) by SkippedLayer, in place;
    in a flat graph, pass the skip operand through in the Addition's place and drop its branch."""
    if candidate.skip is not None:
        _bypass(model, candidate.name, candidate.skip)
        return
    parent_name, _, child = candidate.name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    block = parent.get_submodule(child)
    if candidate.layer:
        setattr(parent, child, SkippedLayer())
        return
    replacement = nn.Identity() if candidate.shortcut is None else block.get_submodule(candidate.shortcut)
    setattr(parent, child, replacement)


def _bypass(model: nn.Module, addition: str, skip: int) -> None:
    assert isinstance(model, fx.GraphModule), "a skip is found only in a flat graph"
    node = next(n for n in model.graph.nodes if n.op == "call_module" and n.target == addition)
    node.replace_all_uses_with(node.args[skip])
    model.graph.erase_node(node)
    model.graph.eliminate_dead_code()
    model.delete_all_unused_submodules()
    model.recompile()

"""Attention heads in a graph converted from ONNX (method §2 on exported transformers).

Exporters write self-attention as plain ops: q/k/v projections, reshapes into heads × head size
whose target shapes come from Shape ops and stored constants (the head count among them), the
score and context matmuls around a softmax, and a reshape back before the output projection. The
constants fix the head count, so no head can be removed from such a graph as it is. For each
attention found this way, the reshapes on its paths become ops that take the head count from the
width (`unflatten(-1, (-1, head size))`, `flatten`), and its four projections are grouped in a
`GraphAttention`, which `find_sites` recognises as a site like any other.

A site is kept only if, on two example sizes, the outputs stay the same and removing a head gives
exactly what silencing it gives; anything else is left as it was (its widths are still pruned
where that is safe), and the run says so.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from core.graph.attention import GraphAttention, find_sites
from core.graph.outputs import named_outputs
from core.inputs import Inputs
from core.intake.fx_shapes import Shapes, shape_free, shapes_at
from core.intake.onnx_ops import stored_tensor
from core.surgery.heads import remove_heads

# how far a projection may be from the matmul it feeds (reshape, transpose, scale) and the like
_MAX_HOPS = 8
_PROJECTIONS = ("q", "k", "v", "out_proj")


@dataclass(frozen=True)
class _Found:
    """One exported attention: its projections' call nodes and the reshapes on its paths, by name."""

    projections: tuple[str, str, str, str]  # q, k, v, output projection
    reshapes: tuple[str, ...]


def prunable_heads(module: fx.GraphModule, examples: list[Inputs]) -> tuple[fx.GraphModule, list[str]]:
    """`module` with every exported attention whose heads can be removed turned into a site, and notes
    on those that cannot. `examples` are inputs of different batch and sequence sizes."""
    found = _find(module)
    if not found:
        return module, []
    examples = [_varied(example, seed) for seed, example in enumerate(examples)]
    with torch.no_grad():
        references = [named_outputs(example.call(module.eval())) for example in examples]
    left = 0
    for index, attention in enumerate(found):
        trial = copy.deepcopy(module)
        name = _site_name(trial, attention, index)
        if _make_site(trial, attention, name, examples) and _behaves(trial, name, examples, references):
            module = trial
        else:
            left += 1
    notes = []
    if left < len(found):
        notes.append(f"{len(found) - left} attention module(s) of the ONNX graph can lose whole heads.")
    if left:
        notes.append(f"{left} attention module(s) of the ONNX graph keep all their heads: their reshapes into "
                     "heads could not be made independent of the head count; the widths around them are pruned.")
    return module, notes


def _varied(example: Inputs, seed: int) -> Inputs:
    """`example` with distinct values: on constant inputs every token looks alike, attention is uniform
    and a wrong head layout would go unseen. Integer inputs other than masks take 0 or 1 (a valid token
    id and token type in any vocabulary), float inputs normal values."""
    generator = torch.Generator().manual_seed(seed)

    def vary(name: str, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.dtype.is_floating_point:
            return torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype)
        if tensor.dtype == torch.bool or "mask" in name.lower():
            return tensor
        return torch.randint(0, 2, tensor.shape, generator=generator, dtype=tensor.dtype)

    return Inputs({name: vary(name, tensor) for name, tensor in example.tensors.items()}, example.positional)


def _module(graph_module: fx.GraphModule, node: object) -> nn.Module | None:
    if not isinstance(node, fx.Node) or node.op != "call_module":
        return None
    return graph_module.get_submodule(str(node.target))


def _variable_args(node: fx.Node) -> list[fx.Node]:
    """The arguments computed from the inputs, not read from stored constants."""
    return [arg for arg in node.args if isinstance(arg, fx.Node) and arg.op != "get_attr"]


def _is_scaling(graph_module: fx.GraphModule, node: fx.Node) -> bool:
    """Mul or Div of a tensor by a stored scalar (the 1/√d of attention scores)."""
    from onnx2torch.node_converters.binary_math_operations import (
        _TORCH_FUNCTION_FROM_ONNX_TYPE,
        OnnxBinaryMathOperation,
    )

    module = _module(graph_module, node)
    if not isinstance(module, OnnxBinaryMathOperation) or module.math_op_function not in (
            _TORCH_FUNCTION_FROM_ONNX_TYPE["Mul"], _TORCH_FUNCTION_FROM_ONNX_TYPE["Div"]):
        return False
    value = stored_tensor(graph_module, node.args[1])
    return value is not None and value.numel() == 1


def _is_flatten(node: fx.Node) -> bool:
    """A flatten that load_onnx made of a reshape to a constant shape: already free of the head count."""
    return node.op == "call_function" and node.target is torch.flatten


def _back_to_projection(graph_module: fx.GraphModule, node: fx.Node, reshapes: list[fx.Node]) -> fx.Node | None:
    """The Linear call that `node` is reshaped, transposed or scaled from (adding the reshapes on the way
    to `reshapes`), or None."""
    from onnx2torch.node_converters.reshape import OnnxReshape
    from onnx2torch.node_converters.transpose import OnnxTranspose

    for _ in range(_MAX_HOPS):
        module = _module(graph_module, node)
        if isinstance(module, nn.Linear):
            return node
        if isinstance(module, OnnxReshape):
            reshapes.append(node)
        elif not isinstance(module, OnnxTranspose) and not _is_scaling(graph_module, node):
            return None
        arg = node.args[0]
        if not isinstance(arg, fx.Node):
            return None
        node = arg
    return None


def _ancestor(graph_module: fx.GraphModule, node: fx.Node, wanted: type[nn.Module] | tuple[type[nn.Module], ...],
              ) -> fx.Node | None:
    """The nearest call of a `wanted` module among the computed ancestors of `node`, within _MAX_HOPS."""
    frontier = [node]
    for _ in range(_MAX_HOPS):
        frontier = [arg for current in frontier for arg in _variable_args(current)]
        hit = next((n for n in frontier if isinstance(_module(graph_module, n), wanted)), None)
        if hit is not None:
            return hit
    return None


def _forward_to_projection(graph_module: fx.GraphModule, node: fx.Node, reshapes: list[fx.Node]) -> fx.Node | None:
    """The Linear call that the context `node` reaches through transposes and reshapes (its only user each
    step, besides Shape ops, which read sizes only), or None."""
    from onnx2torch.node_converters.reshape import OnnxReshape
    from onnx2torch.node_converters.shape import OnnxShape
    from onnx2torch.node_converters.transpose import OnnxTranspose

    for _ in range(_MAX_HOPS):
        users = [user for user in node.users if not isinstance(_module(graph_module, user), OnnxShape)]
        if len(users) != 1:
            return None
        (node,) = users
        module = _module(graph_module, node)
        if isinstance(module, nn.Linear):
            return node
        if isinstance(module, OnnxReshape):
            reshapes.append(node)
        elif not isinstance(module, OnnxTranspose) and not _is_flatten(node):
            return None
    return None


def _find(graph_module: fx.GraphModule) -> list[_Found]:
    """Every context matmul softmax(q·kᵀ)·v whose q, k, v and output projection are Linear layers."""
    from onnx2torch.node_converters.activations import OnnxSoftmaxV1V11
    from onnx2torch.node_converters.matmul import OnnxMatMul

    found = []
    for context in graph_module.graph.nodes:
        if not isinstance(_module(graph_module, context), OnnxMatMul) or len(context.args) != 2:
            continue
        probabilities, values = context.args
        reshapes: list[fx.Node] = []
        v = _back_to_projection(graph_module, values, reshapes) if isinstance(values, fx.Node) else None
        softmax = _ancestor(graph_module, context, (nn.Softmax, OnnxSoftmaxV1V11)) if v is not None else None
        scores = _ancestor(graph_module, softmax, OnnxMatMul) if softmax is not None else None
        if scores is None or len(scores.args) != 2 or not all(isinstance(a, fx.Node) for a in scores.args):
            continue
        q, k = (_back_to_projection(graph_module, arg, reshapes) for arg in scores.args if isinstance(arg, fx.Node))
        out = _forward_to_projection(graph_module, context, reshapes)
        if v is None or q is None or k is None or out is None or len({q, k, v}) != 3:
            continue
        names = (q.name, k.name, v.name, out.name)
        found.append(_Found(projections=names, reshapes=tuple(node.name for node in reshapes)))
    return found


def _site_name(graph_module: fx.GraphModule, attention: _Found, index: int) -> str:
    """The scope the exporter gave the q/k/v projections ("bert/encoder/layer/0/attention/self"), or a number."""
    nodes = {node.name: node for node in graph_module.graph.nodes}
    targets = [str(nodes[name].target) for name in attention.projections[:3]]
    prefix = targets[0][: next((i for i, chars in enumerate(zip(*targets)) if len(set(chars)) > 1), 0)]
    name = prefix.rstrip("/_").replace(".", "_")
    return name if name and not hasattr(graph_module, name) else f"attention_{index}"


def _make_site(graph_module: fx.GraphModule, attention: _Found, name: str, examples: list[Inputs]) -> bool:
    """Rewrite one attention of `graph_module` in place into a GraphAttention site; False when its reshapes
    are not all shape-free on every example."""
    nodes = {node.name: node for node in graph_module.graph.nodes}
    reshapes = [nodes[n] for n in attention.reshapes]
    shapes = [shapes_at(graph_module, reshapes, example) for example in examples]
    if any(set(s) != set(attention.reshapes) for s in shapes):
        return False
    rewrites: list[tuple[fx.Node, Callable[..., torch.Tensor] | None, tuple]] = []
    for node in reshapes:
        per_example = [_rewrite(s[node.name]) for s in shapes]
        if None in per_example or len(set(per_example)) != 1:
            return False
        rewrite = per_example[0]
        assert rewrite is not None  # checked above
        rewrites.append((node, *rewrite))
    heads_and_size = _heads_and_size(shapes[0], attention)
    if heads_and_size is None:
        return False
    for node, function, extra in rewrites:
        source = node.args[0]
        assert isinstance(source, fx.Node)  # a reshape's data comes from a projection, as _find followed it
        if function is None:
            node.replace_all_uses_with(source)
        else:
            with graph_module.graph.inserting_before(node):
                shape_free_node = graph_module.graph.call_function(function, (source, *extra))
            node.replace_all_uses_with(shape_free_node)
        graph_module.graph.erase_node(node)
    calls = [nodes[n] for n in attention.projections]
    linears = [graph_module.get_submodule(str(call.target)) for call in calls]
    if not all(isinstance(linear, nn.Linear) for linear in linears):
        return False
    q, k, v, out = (linear for linear in linears if isinstance(linear, nn.Linear))
    graph_module.add_submodule(name, GraphAttention(q, k, v, out, *heads_and_size))
    for call, attr in zip(calls, _PROJECTIONS, strict=True):
        old = str(call.target)
        call.target = f"{name}.{attr}"
        graph_module.delete_submodule(old)
    graph_module.graph.eliminate_dead_code()
    graph_module.delete_all_unused_submodules()
    graph_module.recompile()
    return True


def _rewrite(shapes: Shapes) -> tuple[Callable[..., torch.Tensor] | None, tuple] | None:
    """(None, ()) for an identity reshape, the shape-free op otherwise, None when there is none."""
    before, after = shapes
    if list(before) == list(after):
        return None, ()
    return shape_free(before, after)


def _heads_and_size(shapes: dict[str, Shapes], attention: _Found) -> tuple[int, int] | None:
    """Head count and head size from the reshape that splits a projection into heads."""
    for name in attention.reshapes:
        before, after = shapes[name]
        if len(after) == len(before) + 1:
            return int(after[-2]), int(after[-1])
    return None


@torch.no_grad()
def _behaves(graph_module: fx.GraphModule, name: str, examples: list[Inputs],
             references: list[dict[str, torch.Tensor]]) -> bool:
    """The rewritten model computes what it did, and removing the first head of site `name` equals
    silencing it (zero values): the head layout is what the site assumes."""
    try:
        for example, reference in zip(examples, references, strict=True):
            if not _same(named_outputs(example.call(graph_module.eval())), reference):
                return False
        sites = [site for site in find_sites(graph_module)[0] if site.name == name]
        if not sites:
            return False
        for site in sites:
            removed, silenced = copy.deepcopy(graph_module), copy.deepcopy(graph_module)
            remove_heads(removed, site, [0])
            values = silenced.get_submodule(site.name).get_submodule(site.qkv[2])
            assert isinstance(values, nn.Linear)  # a GraphAttention's projections are
            values.weight[: site.head_dim].zero_()
            if values.bias is not None:
                values.bias[: site.head_dim].zero_()
            for example in examples:
                if not _same(named_outputs(example.call(removed.eval())), named_outputs(example.call(silenced.eval()))):
                    return False
    except Exception:  # a rewritten graph that fails to run is one that keeps its original form
        return False
    return True


def _same(got: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> bool:
    return got.keys() == reference.keys() and all(
        got[name].shape == reference[name].shape and
        torch.allclose(got[name].float(), reference[name].float(), rtol=1e-4, atol=1e-5) for name in reference)

"""A plan applied to the model itself for a moment, and undone: what a copy of the model with the plan
applied would compute, without copying the model or tracing its dependency graph again.

Drift allocation measures one such trial per group per step (core.run.allocation); on a 100 M-parameter
model a full copy and two graph traces per trial cost more than the trial's forward pass. Only the
modules the plan touches are saved: their attributes (widths, head counts), their parameters and buffers
(surgery replaces them, and compensation changes a consumer's in place). torch-pruning's graph follows
modules by identity and recomputes its index mappings from the current widths whenever a group is
resolved, so the graph of the model stays valid once the modules are restored; what its own pruning
of an unwrapped nn.Parameter rewrites in the graph is restored with them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from core.graph.attention import AttentionSite, find_sites
from core.graph.outputs import named_outputs
from core.inputs import Inputs
from core.modes import evaluating
from core.surgery.apply import apply_plan
from core.surgery.groups import PrunableGroup
from core.surgery.units import Means, Plan, UnitKind


@dataclass
class _Saved:
    module: nn.Module
    attributes: dict[str, Any]
    tensors: dict[str, torch.Tensor]  # the data of its own parameters and buffers, by name

    @classmethod
    def of(cls, module: nn.Module) -> _Saved:
        attributes = dict(vars(module))
        # the dicts themselves are copied: surgery assigns new parameters into them
        for key in ("_parameters", "_buffers"):
            attributes[key] = dict(attributes[key])
        tensors = {name: t.detach().clone() for name, t in
                   [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)] if t is not None}
        return cls(module, attributes, tensors)

    def restore(self) -> None:
        vars(self.module).clear()
        vars(self.module).update(self.attributes)
        for name, tensor in [*self.module.named_parameters(recurse=False), *self.module.named_buffers(recurse=False)]:
            if tensor is not None:
                tensor.data = self.tensors[name]


@dataclass
class _SavedGraph:
    """What torch-pruning rewrites in its graph when it prunes an unwrapped nn.Parameter (Group.prune)."""

    graph: tp.DependencyGraph
    param_to_name: dict[nn.Parameter, str]
    module2node: dict[Any, Any]
    node_modules: dict[Any, Any]
    history: int

    @classmethod
    def of(cls, graph: tp.DependencyGraph) -> _SavedGraph:
        return cls(graph, dict(graph._param_to_name), dict(graph.module2node),
                   {node: node.module for node in graph.module2node.values()}, len(graph._pruning_history))

    def restore(self) -> None:
        graph = self.graph
        graph._param_to_name = self.param_to_name
        graph.module2node = self.module2node
        for node, module in self.node_modules.items():
            node.module = module
        del graph._pruning_history[self.history:]


def touched_modules(model: nn.Module, graph: tp.DependencyGraph, plan: Plan,
                    sites: dict[str, AttentionSite]) -> list[nn.Module]:
    """Every module whose attributes, parameters or buffers applying `plan` can change: the modules of each
    channel group's dependencies (or, for an unwrapped parameter, the module that holds it), and the
    attention module and output projection of each head group."""
    touched: dict[int, nn.Module] = {}
    for key, idxs in plan.items():
        if key.kind is UnitKind.HEADS:
            site = sites[key.name]
            modules = [*model.get_submodule(site.name).modules(), model.get_submodule(site.out)]
        elif key.kind is UnitKind.CHANNELS:
            root = model.get_submodule(key.name)
            group = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, idxs)
            modules = [_holder(model, graph, dep.target.module) for dep, _ in group]
        else:
            continue
        touched |= {id(m): m for m in modules}
    return list(touched.values())


def _holder(model: nn.Module, graph: tp.DependencyGraph, target: nn.Module | nn.Parameter) -> nn.Module:
    if isinstance(target, nn.Parameter):
        return model.get_submodule(graph._param_to_name[target].rpartition(".")[0])
    return target


@contextmanager
def applied(model: nn.Module, example: Inputs, graph: tp.DependencyGraph, plan: Plan,
            means: Means | None = None) -> Iterator[list[nn.Module]]:
    """`model` with `plan` applied (as apply_plan applies it, through `graph`, which must be the graph of
    `model`), for the duration of the block, which is given the modules the plan touches; restored
    afterwards, even when the block raises."""
    sites = {site.name: site for site in find_sites(model)[0]} if any(
        key.kind is UnitKind.HEADS for key in plan) else {}
    touched = touched_modules(model, graph, plan, sites)
    saved = [_Saved.of(module) for module in touched]
    saved_graph = _SavedGraph.of(graph)
    try:
        apply_plan(model, example, plan, means, graph=graph)
        yield touched
    finally:
        for entry in saved:
            entry.restore()
        saved_graph.restore()


def survives_channel_cut(model: nn.Module, example: Inputs, graph: tp.DependencyGraph, group: PrunableGroup) -> bool:
    """Whether `model` still runs, every output keeping its shape, with one channel of `group` removed
    (tried on the model itself through `graph`, its dependency graph, in eval mode, and undone: a copy and
    a trace per group cost more than the rest of a large model's first step).

    A reshape into fixed-size parts (attention heads: view(batch, seq, -1, head_dim)) accepts
    only whole parts, which per-channel pruning cannot promise; such groups are left alone. A
    group whose channels reach an output (an embedding, a second head) is the model's interface.
    """
    with evaluating(model), torch.no_grad():
        shapes = _output_shapes(example.call(model))
        try:
            with applied(model, example, graph, {group.key: [g * group.width for g in range(group.ch_groups)]}):
                return _output_shapes(example.call(model)) == shapes
        except Exception:  # any failure means this group cannot be cut channel by channel
            return False


def _output_shapes(output: object) -> dict[str, torch.Size]:
    return {name: tensor.shape for name, tensor in named_outputs(output).items()}

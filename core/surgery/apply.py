"""Applying a plan in place: heads first, then channel groups through the dependency graph (BN,
consumers and residual partners follow), with compensation in the layers that lose inputs."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from core.graph.attention import AttentionSite, find_sites
from core.graph.layers import DenseLayer, compensates, mixes_densely
from core.importance.statistics import InputStats
from core.inputs import Inputs
from core.surgery.compensation import compensate
from core.surgery.groups import build_graph
from core.surgery.heads import remove_heads
from core.surgery.units import Means, Plan, UnitKey, UnitKind

_IN_FNS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
_OUT_FNS = (tp.prune_conv_out_channels, tp.prune_linear_out_channels, tp.prune_depthwise_conv_out_channels)


def apply_plan(model: nn.Module, example: Inputs, plan: Plan, means: Means | None = None,
               graph: tp.DependencyGraph | None = None) -> None:
    """Remove the planned heads, then the planned channels, in place (BN, consumers and residual
    partners follow). Heads go first: removing them leaves every channel index of the plan valid.

    With `means`, the consumer of every removed unit that has an entry makes up for it first (see
    core.surgery.compensation.compensate). `graph`, the dependency graph of `model` if the
    caller has it, saves tracing the model again.
    """
    # checking which fits a plan undoes costs a second dependency graph: only for layers that compensate
    means = {key: entry for key, entry in (means or {}).items() if compensates(model.get_submodule(entry[0]))}
    heads = {key.name: idxs for key, idxs in plan.items() if key.kind is UnitKind.HEADS}
    channels = {key: idxs for key, idxs in plan.items() if key.kind is UnitKind.CHANNELS}
    sites = {site.name: site for site in find_sites(model)[0]} if heads else {}
    if channels and any(stats.cov is not None for _, stats in means.values()):
        graph = graph or build_graph(model, example)
        means = _mean_only_where_inputs_change(model, graph, channels, means, sites)
    if heads:
        for name, idxs in heads.items():
            entry = means.get(UnitKey(UnitKind.HEADS, name))
            remove_heads(model, sites[name], idxs, None if entry is None else entry[1])
    if not channels:
        return
    if graph is None or heads:
        # the graph follows the widths the heads' removal left
        graph = build_graph(model, example)
    names = {module: name for name, module in model.named_modules()}
    means = dict(means)  # reader statistics follow the columns each group takes away
    for key, idxs in channels.items():
        root = model.get_submodule(key.name)
        pruner = graph.get_pruner_of_module(root)
        group = graph.get_pruning_group(root, pruner.prune_out_channels, idxs)
        if graph.check_pruning_group(group):
            _compensate(model, group, names, means)
            group.prune()


def _mean_only_where_inputs_change(model: nn.Module, graph: tp.DependencyGraph, channels: Plan, means: Means,
                                   sites: dict[str, AttentionSite]) -> Means:
    """`means` without the covariance for units whose fit this plan undoes: the least-squares fit
    predicts removed units from the kept inputs as they were, so it no longer holds when the units'
    own inputs lose channels too (a residual-stream cut narrows every MLP's and head's input), or
    when their consumer loses other inputs (head-size channels under the removed heads' output
    projection). Their mean still stands as the best constant."""
    names = {module: name for name, module in model.named_modules()}
    narrowed_by: dict[str, set[UnitKey]] = {}  # layer -> the groups that cut its inputs
    for group_key, idxs in channels.items():
        root = model.get_submodule(group_key.name)
        group = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, idxs)
        for dep, _ in group:
            if dep.handler in _IN_FNS:
                narrowed_by.setdefault(names[dep.target.module], set()).add(group_key)

    def undone(key: UnitKey, consumer: str) -> bool:
        if key.kind is UnitKind.READERS:
            return False  # a reader's fit uses the columns it keeps, whichever group takes the others
        if key.kind is UnitKind.HEADS:
            site = sites.get(key.name)
            producers = [] if site is None else [f"{site.name}.{attr}" for attr in site.qkv]
        else:
            producers = [key.name]
        return any(p in narrowed_by for p in producers) or bool(narrowed_by.get(consumer, set()) - {key})

    return {key: (consumer, InputStats(stats.mean) if undone(key, consumer) else stats)
            for key, (consumer, stats) in means.items()}


def _compensate(model: nn.Module, group: tp.dependency.Group, names: dict[nn.Module, str], means: Means) -> None:
    """Make up for the group's removed units in their consumers, and for every other removed input
    column in the Linear that reads it (`compensate`, statistics from `means`). Reader
    statistics in `means` lose the removed columns, so a later group of the plan indexes them as
    pruned."""
    removed_inputs = {dep.target.module: sorted(idxs) for dep, idxs in group
                      if dep.handler in _IN_FNS and mixes_densely(dep.target.module)}
    made_up = set()
    for dep, idxs in group:
        entry = means.get(UnitKey(UnitKind.CHANNELS, names.get(dep.target.module, "")))
        if entry is None or dep.handler not in _OUT_FNS:
            continue
        consumer = model.get_submodule(entry[0])
        # only when the group removes the same input columns as output units (no index remapping)
        if removed_inputs.get(consumer) == sorted(idxs):
            assert isinstance(consumer, DenseLayer)  # mixes_densely held
            compensate(consumer, list(idxs), entry[1])
            made_up.add(consumer)
    for reader, columns in removed_inputs.items():
        key = UnitKey(UnitKind.READERS, names.get(reader, ""))
        entry = means.get(key)
        if entry is None or not isinstance(reader, nn.Linear) or len(entry[1].mean) != reader.in_features:
            continue
        if reader not in made_up and reader.bias is not None:
            compensate(reader, columns, entry[1])
        kept = torch.ones(len(entry[1].mean), dtype=torch.bool)
        kept[columns] = False
        means[key] = (entry[0], entry[1].restricted(kept))

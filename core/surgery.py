"""Structured surgery through torch-pruning's dependency graph.

Everything that touches torch-pruning lives here, so the rest of core/ deals only in
"groups" (sets of coupled channels that must be removed together) and "plans"
(which channels of which group to remove).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping
from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

from core.attention import HEADS, AttentionSite, find_sites, remove_heads
from core.divergence import InputStats, compensate_linear

ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)

# A channel that a flatten spreads over more positions than this (a CNN's last feature map before
# its classifier spreads over 7×7 at most) is part of a window/patch layout (Swin, MaxViT)
# that the dependency graph resolves only at a cost quadratic in the spread, and that reshapes
# into heads would reject anyway: such groups are left alone.
MAX_CHANNEL_SPREAD = 256

_IN_FNS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)

# layer name (or HEADS + attention name) -> (name of the Linear that reads its units, statistics of
# that Linear's inputs); READERS + a Linear's name -> (that name, statistics of its inputs), for a
# Linear that loses inputs other than as the one consumer of removed units (a residual-stream cut)
Means = dict[str, tuple[str, InputStats]]
READERS = "readers:"

# name of a group's root module -> channel indices to remove (already expanded over
# channel groups of grouped convolutions)
Plan = dict[str, list[int]]


@dataclass
class PrunableGroup:
    """Coupled channels rooted at one Conv/Linear output; `width` counts one channel group."""

    root_name: str
    group: tp.dependency.Group
    width: int
    ch_groups: int
    min_width: int
    # channel counts follow round_to; attention heads are whole units and do not
    rounds: bool = True

    @property
    def capacity(self) -> int:
        return max(self.width - self.min_width, 0)


def _tolerate_unsized_reshapes() -> None:
    """torch-pruning 1.6.1 infers zero channels on one side of a channel shuffle (ShuffleNet's
    view/transpose/view) and divides by it while building the graph. Such a reshape only
    permutes channels, so it is left without an index mapping, as the library already does
    when it cannot size a reshape at all."""
    original = index_mapping.update_reshape_index_mapping
    if getattr(original, "idap_guarded", False):
        return

    def guarded(graph: tp.DependencyGraph, node: object) -> None:
        try:
            original(graph, node)
        except ZeroDivisionError:
            unsized = getattr(graph, "idap_unsized_reshapes", set())
            unsized.add(node)
            graph.idap_unsized_reshapes = unsized

    guarded.idap_guarded = True  # type: ignore[attr-defined]
    index_mapping.update_reshape_index_mapping = guarded


def build_graph(model: nn.Module, example: torch.Tensor) -> tp.DependencyGraph:
    _tolerate_unsized_reshapes()
    return tp.DependencyGraph().build_dependency(model, example_inputs=example)


def _channel_groups(graph: tp.DependencyGraph, group: tp.dependency.Group) -> int:
    """How many interleaved channel groups a grouped convolution imposes (1 if none).

    Depthwise convolutions are excluded: the graph already couples their input and
    output channels one to one.
    """
    counts = [1]
    for dep, _ in group:
        module = dep.target.module
        if isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels:
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None:
            continue
        if graph.is_out_channel_pruning_fn(dep.handler):
            counts.append(pruner.get_out_channel_groups(module))
        else:
            counts.append(pruner.get_in_channel_groups(module))
    return max(counts)


def _reaches_unsized_reshape(graph: tp.DependencyGraph, root: nn.Module) -> bool:
    """Whether the channels `root` produces flow into a reshape the graph could not size.

    Resolving such a group through torch-pruning never ends (the index mappings of a channel
    shuffle multiply), so these roots are left alone. The walk follows channel-preserving
    nodes both ways and stops at layers that mix channels.
    """
    unsized = getattr(graph, "idap_unsized_reshapes", None)
    if not unsized:
        return False
    start = graph.module2node[root]
    seen = {start}
    frontier = list(start.outputs)
    while frontier:
        node = frontier.pop()
        if node in seen:
            continue
        seen.add(node)
        if node in unsized:
            return True
        module = node.module
        mixes = isinstance(module, ROOT_TYPES) and not (
            isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels
        )
        if mixes:
            continue
        frontier.extend(node.outputs)
        frontier.extend(node.inputs)
    return False


def _spreads_too_far(graph: tp.DependencyGraph, root: nn.Module, fn: Callable) -> bool:
    """Whether pruning `root`'s outputs reaches flattens that together spread one channel over
    more than MAX_CHANNEL_SPREAD positions. Walks the dependencies torch-pruning would follow,
    tracking the spread instead of index lists, so it costs a few passes over the graph."""
    start = graph.module2node[root]
    stack = [(start, fn, 1)]
    widest = {(start, fn): 1}
    while stack:
        node, trigger, spread = stack.pop()
        for dep in node.dependencies:
            if not dep.is_triggered_by(trigger):
                continue
            reached = spread
            for mapping in dep.index_mapping:
                if isinstance(mapping, _FlattenIndexMapping):
                    reached = max(reached // mapping._stride, 1) if mapping.reverse else reached * mapping._stride
            if reached > MAX_CHANNEL_SPREAD:
                return True
            key = (dep.target, dep.handler)
            if widest.get(key, 0) < reached:
                widest[key] = reached
                stack.append((dep.target, dep.handler, reached))
    return False


def _resolvable_groups(graph: tp.DependencyGraph, ignored: list[nn.Module]) -> Iterator[tp.dependency.Group]:
    """Like torch-pruning's get_all_groups, but a root whose coupling the graph cannot resolve
    (index mappings through channel shuffles) is skipped instead of aborting the whole walk."""
    visited: set[nn.Module] = set()
    ignored_set = set(ignored) | set(graph.IGNORED_LAYERS_IN_TRACING)
    for module in list(graph.module2node):
        if module in ignored_set or module in visited or not isinstance(module, ROOT_TYPES):
            continue
        pruner = graph.get_pruner_of_module(module)
        channels = None if pruner is None else pruner.get_out_channels(module)
        if channels is None:
            continue
        if _reaches_unsized_reshape(graph, module):
            continue
        if _spreads_too_far(graph, module, pruner.prune_out_channels):
            continue
        try:
            group = graph.get_pruning_group(module, pruner.prune_out_channels, list(range(channels)))
        except (IndexError, ValueError, ZeroDivisionError):
            continue
        outputs = [dep.target.module for dep, _ in group if graph.is_out_channel_pruning_fn(dep.handler)]
        visited.update(outputs)
        if not any(m in ignored_set for m in outputs):
            yield group


def prunable_groups(
    graph: tp.DependencyGraph,
    model: nn.Module,
    ignored: Iterable[nn.Module],
    original_widths: dict[str, int],
    min_width_fraction: float,
    min_channels: int,
    survives: Callable[[PrunableGroup], bool] | None = None,
) -> list[PrunableGroup]:
    """All groups the planner may shrink, with their minimum widths.

    `original_widths` (root name -> width before any pruning) is filled on first sight,
    so the minimum stays relative to the unpruned network across steps. Groups whose
    channels pass through a reshape are kept only if `survives` says the model still runs
    with one of their channels removed.
    """
    names = {module: name for name, module in model.named_modules()}
    ignored_modules = [m for layer in ignored for m in layer.modules()]
    result = []
    for group in _resolvable_groups(graph, ignored_modules):
        root = group[0].dep.target.module
        name = names.get(root)
        if name is None:
            continue
        ch_groups = _channel_groups(graph, group)
        total = graph.get_out_channels(root)
        if total is None or total % ch_groups:
            continue
        width = total // ch_groups
        original = original_widths.setdefault(name, width)
        minimum = min(width, max(min_channels, math.ceil(original * min_width_fraction)))
        candidate = PrunableGroup(name, group, width, ch_groups, minimum)
        if survives is not None and _passes_reshape(group) and not survives(candidate):
            continue
        result.append(candidate)
    return result


def _passes_reshape(group: tp.dependency.Group) -> bool:
    return any(isinstance(dep.target.module, tp.ops._ReshapeOp) for dep, _ in group)


def survives_channel_cut(model: nn.Module, example: torch.Tensor, group: PrunableGroup) -> bool:
    """Whether `model` still runs with one channel of `group` removed (checked on a copy).

    A reshape into fixed-size parts (attention heads: view(batch, seq, -1, head_dim)) accepts
    only whole parts, which per-channel pruning cannot promise; such groups are left alone.
    """
    candidate = copy.deepcopy(model)
    try:
        apply_plan(candidate, example, {group.root_name: [g * group.width for g in range(group.ch_groups)]})
        with torch.no_grad():
            candidate(example)
    except Exception:  # any failure means this group cannot be cut channel by channel
        return False
    return True


def _rounded_count(width: int, selected: int, minimum: int, round_to: int | None) -> int:
    """Channels to remove so the remaining width is a multiple of `round_to` (nearest)."""
    if not round_to or selected == 0:
        return selected
    floor_width = math.ceil(minimum / round_to) * round_to
    keep = max(round_to * round((width - selected) / round_to), floor_width)
    return max(width - keep, 0)


def make_plan(groups: list[PrunableGroup], scores: list[torch.Tensor], k: int, round_to: int | None) -> Plan:
    """Remove the `k` lowest-scoring channels across all groups (global ranking).

    Scores are already comparable across groups (normalised per group). No group goes
    below its minimum width.
    """
    entries = [
        (float(score), g, c)
        for g, group_scores in enumerate(scores)
        for c, score in enumerate(group_scores.tolist())
    ]
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    taken = [0] * len(groups)
    chosen = 0
    for _, g, _ in entries:
        if chosen >= k:
            break
        if taken[g] < groups[g].capacity:
            taken[g] += 1
            chosen += 1
    plan: Plan = {}
    for g, group in enumerate(groups):
        n = _rounded_count(group.width, taken[g], group.min_width, round_to if group.rounds else None)
        if n == 0:
            continue
        lowest = torch.argsort(scores[g], stable=True)[:n].tolist()
        plan[group.root_name] = sorted(
            idx + offset * group.width for offset in range(group.ch_groups) for idx in lowest
        )
    return plan


def apply_plan(model: nn.Module, example: torch.Tensor, plan: Plan, means: Means | None = None) -> None:
    """Remove the planned heads, then the planned channels, in place (BN, consumers and residual
    partners follow). Heads go first: removing them leaves every channel index of the plan valid.

    With `means`, the consumer of every removed unit that has an entry makes up for it first (see
    divergence.compensate_linear).
    """
    means = means or {}
    heads = {name.removeprefix(HEADS): idxs for name, idxs in plan.items() if name.startswith(HEADS)}
    channels = {name: idxs for name, idxs in plan.items() if not name.startswith(HEADS)}
    sites = {site.name: site for site in find_sites(model)[0]} if heads else {}
    if channels and any(stats.cov is not None for _, stats in means.values()):
        means = _mean_only_where_inputs_change(model, example, channels, means, sites)
    if heads:
        for name, idxs in heads.items():
            entry = means.get(HEADS + name)
            remove_heads(model, sites[name], idxs, None if entry is None else entry[1])
    if not channels:
        return
    graph = build_graph(model, example)
    names = {module: name for name, module in model.named_modules()}
    means = dict(means)  # reader statistics follow the columns each group takes away
    for name, idxs in channels.items():
        root = model.get_submodule(name)
        pruner = graph.get_pruner_of_module(root)
        group = graph.get_pruning_group(root, pruner.prune_out_channels, idxs)
        if graph.check_pruning_group(group):
            _compensate(model, group, names, means)
            group.prune()


def _mean_only_where_inputs_change(model: nn.Module, example: torch.Tensor, channels: Plan, means: Means,
                                   sites: dict[str, AttentionSite]) -> Means:
    """`means` without the covariance for units whose fit this plan undoes: the least-squares fit
    predicts removed units from the kept inputs as they were, so it no longer holds when the units'
    own inputs lose channels too (a residual-stream cut narrows every MLP's and head's input), or
    when their consumer loses other inputs (head-size channels under the removed heads' output
    projection). Their mean still stands as the best constant."""
    graph = build_graph(model, example)
    names = {module: name for name, module in model.named_modules()}
    narrowed_by: dict[str, set[str]] = {}  # layer -> roots of the groups that cut its inputs
    for name, idxs in channels.items():
        root = model.get_submodule(name)
        group = graph.get_pruning_group(root, graph.get_pruner_of_module(root).prune_out_channels, idxs)
        for dep, _ in group:
            if dep.handler in _IN_FNS:
                narrowed_by.setdefault(names[dep.target.module], set()).add(name)

    def undone(key: str, consumer: str) -> bool:
        if key.startswith(READERS):
            return False  # a reader's fit uses the columns it keeps, whichever group takes the others
        if key.startswith(HEADS):
            site = sites.get(key.removeprefix(HEADS))
            producers = [] if site is None else [f"{site.name}.{attr}" for attr in site.qkv]
        else:
            producers = [key]
        return any(p in narrowed_by for p in producers) or bool(narrowed_by.get(consumer, set()) - {key})

    return {key: (consumer, InputStats(stats.mean) if undone(key, consumer) else stats)
            for key, (consumer, stats) in means.items()}


def _compensate(model: nn.Module, group: tp.dependency.Group, names: dict[nn.Module, str], means: Means) -> None:
    """Make up for the group's removed units in their consumers, and for every other removed input
    column in the Linear that reads it (`compensate_linear`, statistics from `means`). Reader
    statistics in `means` lose the removed columns, so a later group of the plan indexes them as
    pruned."""
    removed_inputs = {dep.target.module: sorted(idxs) for dep, idxs in group
                      if dep.handler == tp.prune_linear_in_channels}
    made_up = set()
    for dep, idxs in group:
        entry = means.get(names.get(dep.target.module, ""))
        if entry is None or dep.handler != tp.prune_linear_out_channels:
            continue
        consumer = model.get_submodule(entry[0])
        # only when the group removes the same input columns as output units (no index remapping)
        if removed_inputs.get(consumer) == sorted(idxs):
            compensate_linear(consumer, list(idxs), entry[1])
            made_up.add(consumer)
    for reader, columns in removed_inputs.items():
        key = READERS + names.get(reader, "")
        entry = means.get(key)
        if entry is None or len(entry[1].mean) != reader.in_features:
            continue
        if reader not in made_up and reader.bias is not None:
            compensate_linear(reader, columns, entry[1])
        kept = torch.ones(len(entry[1].mean), dtype=torch.bool)
        kept[columns] = False
        cov = entry[1].cov
        means[key] = (entry[0], InputStats(entry[1].mean[kept], None if cov is None else cov[kept][:, kept]))


def planned_units(plan: Plan) -> int:
    return sum(len(idxs) for idxs in plan.values())


GroupScorer = Callable[[tp.dependency.Group], torch.Tensor | None]


def score_groups(groups: list[PrunableGroup], scorer: GroupScorer, normalise: bool = True) -> list[torch.Tensor]:
    """Per-channel scores for each group, averaged over channel groups, normalised by the group mean
    unless the scorer's are comparable across groups already (`normalise=False`).

    Per-group mean normalisation is what makes scores of different layers comparable
    for global ranking (method §2). A group the scorer cannot see gets uniform scores.
    """
    out = []
    for group in groups:
        raw = scorer(group.group)
        if raw is None:
            raw = torch.ones(group.width * group.ch_groups)
        raw = raw.detach().float().cpu().view(group.ch_groups, -1).mean(0)
        out.append(raw / (raw.mean() + 1e-12) if normalise else raw)
    return out

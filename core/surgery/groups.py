"""Prunable groups: sets of coupled channels that must be removed together, found through
torch-pruning's dependency graph, with the minimum width each may keep.

The rest of core/ deals in these groups and in plans (which units of which group to remove);
pruning through torch-pruning happens in core.surgery only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping
from torch_pruning.dependency.index_mapping import _FlattenIndexMapping

from core.graph.attention import AttentionSite, find_sites
from core.inputs import Inputs
from core.surgery.units import UnitKey, UnitKind

ROOT_TYPES = (nn.modules.conv._ConvNd, nn.Linear)

# A channel that a flatten spreads over more positions than this (a CNN's last feature map before
# its classifier spreads over 7×7 at most) is part of a window/patch layout (Swin, MaxViT)
# that the dependency graph resolves only at a cost quadratic in the spread, and that reshapes
# into heads would reject anyway: such groups are left alone.
MAX_CHANNEL_SPREAD = 256


@dataclass
class PrunableGroup:
    """Units removed together: coupled channels rooted at one Conv/Linear output, or the heads of one
    attention module (`group` is then its AttentionSite); `width` counts one channel group."""

    key: UnitKey
    group: tp.dependency.Group | AttentionSite
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
            unsized: set[object] = getattr(graph, "idap_unsized_reshapes", set())
            unsized.add(node)
            graph.idap_unsized_reshapes = unsized

    guarded.idap_guarded = True  # type: ignore[attr-defined]
    index_mapping.update_reshape_index_mapping = guarded


def build_graph(model: nn.Module, example: Inputs) -> tp.DependencyGraph:
    _tolerate_unsized_reshapes()
    return tp.DependencyGraph().build_dependency(model, example_inputs=example.example_inputs)


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
    original_widths: dict[UnitKey, int],
    min_width_fraction: float,
    min_channels: int,
    survives: Callable[[PrunableGroup], bool] | None = None,
    check_every_group: bool = False,
) -> list[PrunableGroup]:
    """All groups the planner may shrink, with their minimum widths.

    `original_widths` (group key -> width before any pruning) is filled on first sight,
    so the minimum stays relative to the unpruned network across steps. Groups whose
    channels pass through a reshape (with `check_every_group`, all groups) are kept only if
    `survives` says the model still runs, its outputs unchanged in shape, with one of their
    channels removed.
    """
    names = {module: name for name, module in model.named_modules()}
    # the projections of recognised attention lose whole heads (PrunableGroups of their own), never
    # single channels; their groups are not resolved at all (through rotary embeddings' slices and
    # concatenations torch-pruning's walk does not end)
    heads = [proj for site in find_sites(model)[0] for proj in site.projections(model)]
    ignored_modules = [m for layer in ignored for m in layer.modules()] + heads
    rms_weights = {id(weight) for weight in _rms_norm_weights(model)}  # parameters compare elementwise
    result = []
    for group in _resolvable_groups(graph, ignored_modules):
        root = group[0].dep.target.module
        name = names.get(root)
        if name is None or any(id(dep.target.module) in rms_weights for dep, _ in group):
            continue
        ch_groups = _channel_groups(graph, group)
        total = graph.get_out_channels(root)
        if total is None or total % ch_groups:
            continue
        width = total // ch_groups
        key = UnitKey(UnitKind.CHANNELS, name)
        original = original_widths.setdefault(key, width)
        minimum = min(width, max(min_channels, math.ceil(original * min_width_fraction)))
        candidate = PrunableGroup(key, group, width, ch_groups, minimum)
        checked = check_every_group or _passes_reshape(group)
        if survives is not None and checked and not survives(candidate):
            continue
        result.append(candidate)
    return result


def _rms_norm_weights(model: nn.Module) -> list[nn.Parameter]:
    """The weights of RMSNorm layers (Llama-style decoders), which torch-pruning sees as bare parameters.

    The channels they scale are a decoder's residual stream, left whole (README, Transformers): each
    RMSNorm divides by the root mean square over all of them, so no channel is removable on its own,
    and the embedding table that writes them is often the output head's weight too (tied embeddings).
    """
    weights = [getattr(module, "weight", None) for module in model.modules()
               if type(module).__name__.endswith("RMSNorm")]
    return [weight for weight in weights if isinstance(weight, nn.Parameter)]


def _passes_reshape(group: tp.dependency.Group) -> bool:
    return any(isinstance(dep.target.module, tp.ops._ReshapeOp) for dep, _ in group)

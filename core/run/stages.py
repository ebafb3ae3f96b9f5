"""Stage 1 (iterative divergence-aware filter pruning) and Stage 2 (block removal)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
import torch_pruning as tp
from torch import nn

from core.graph.attention import AttentionSite, find_sites
from core.graph.blocks import BlockCandidate, SkippedLayer, find_blocks, remove_block
from core.importance.divergence import (
    DivergenceScorer,
    GroupScorer,
    baseline_scorer,
    block_divergence,
    filter_divergence,
    taylor_gradients,
)
from core.importance.heads import head_divergence, head_taylor, head_weight_norms
from core.importance.statistics import InputStats, linear_input_stats
from core.run.allocation import drift_per_size
from core.run.context import RunContext
from core.surgery.apply import apply_plan, survives_channel_cut
from core.surgery.groups import PrunableGroup, build_graph, prunable_groups
from core.surgery.heads import removable
from core.surgery.plan import make_plan, planned_units, score_groups
from core.surgery.units import UnitKey, UnitKind


def group_candidates(ctx: RunContext, model: nn.Module, graph: tp.DependencyGraph) -> list[PrunableGroup]:
    """The prunable channel groups and attention-head groups of `model` under the run's ignore
    list and minimum widths."""
    ignored = [model.get_submodule(name) for name in ctx.ignored]
    opts = ctx.options

    def survives(group: PrunableGroup) -> bool:
        if group.key not in ctx.cuttable:
            ctx.cuttable[group.key] = survives_channel_cut(model, ctx.example, group)
        return ctx.cuttable[group.key]

    groups = prunable_groups(graph, model, ignored, ctx.original_widths, opts.min_width_fraction,
                             opts.min_channels, survives)
    return groups + _head_groups(ctx, model)


def _head_groups(ctx: RunContext, model: nn.Module) -> list[PrunableGroup]:
    groups = []
    for site in find_sites(model)[0]:
        key = UnitKey(UnitKind.HEADS, site.name)
        if any(name in ctx.ignored for name in (site.name, site.out)):
            continue
        if key not in ctx.cuttable:
            ctx.cuttable[key] = removable(model, site, ctx.example)
        if not ctx.cuttable[key]:
            continue
        width = site.num_heads(model)
        original = ctx.original_widths.setdefault(key, width)
        minimum = min(width, max(1, math.ceil(original * ctx.options.min_width_fraction)))
        groups.append(PrunableGroup(key, site, width, 1, minimum, rounds=False))
    return groups


def _group_scores(ctx: RunContext, model: nn.Module, graph: tp.DependencyGraph,
                  groups: list[PrunableGroup]) -> list[torch.Tensor]:
    """Unit scores of every group, comparable across groups (and, with mean compensation, the
    statistics their consumers compensate with in ctx.unit_means, for the plans made from these
    scores)."""
    criterion = ctx.options.criterion
    batch = ctx.options.batch_size
    sites = [g.group for g in groups if isinstance(g.group, AttentionSite)]
    layer_sum = ctx.options.group_scores == "layer_sum"
    ctx.unit_means = {}
    if criterion == "divergence":
        compensate = ctx.options.mean_compensation
        fit = compensate and ctx.options.least_squares_compensation
        layer_means: dict[nn.Module, tuple[nn.Linear, InputStats]] | None = {} if compensate else None
        head_means: dict[str, InputStats] | None = {} if compensate else None
        channels: GroupScorer = DivergenceScorer(
            filter_divergence(model, graph, ctx.calib, ctx.device, batch, means_out=layer_means, with_cov=fit),
            layer_sum=layer_sum)
        heads = head_divergence(model, sites, ctx.calib, ctx.device, batch, means_out=head_means,
                                with_cov=fit) if sites else {}
        if layer_means is not None and head_means is not None:
            names = {module: name for name, module in model.named_modules()}
            ctx.unit_means = {
                UnitKey(UnitKind.CHANNELS, names[m]): (names[c], mean) for m, (c, mean) in layer_means.items()} | {
                UnitKey(UnitKind.HEADS, site.name): (site.out, head_means[site.name])
                for site in sites if site.name in head_means}
            consumers = {c: stats for c, stats in layer_means.values()} | {
                model.get_submodule(site.out): head_means[site.name] for site in sites if site.name in head_means}
            ctx.unit_means |= {UnitKey(UnitKind.READERS, names[m]): (names[m], stats) for m, stats in
                               linear_input_stats(model, ctx.calib, ctx.device, batch, fit, consumers).items()}
        if layer_sum:
            heads = {name: s / (s.mean() + 1e-12) for name, s in heads.items()}
    else:
        if criterion == "taylor":
            labels = ctx.recovery.y[: len(ctx.calib)] if ctx.recovery.y is not None else None
            taylor_gradients(model, ctx.calib, labels, ctx.device, batch)
        channels = baseline_scorer(criterion)
        heads = {site.name: _baseline_head_scores(criterion, model, site) for site in sites}

    def score(group: object) -> torch.Tensor | None:
        return heads.get(group.name) if isinstance(group, AttentionSite) else channels(group)

    scores = score_groups(groups, score, normalise=not (criterion == "divergence" and layer_sum))
    model.zero_grad(set_to_none=True)  # Taylor's gradients
    if criterion == "divergence" and allocates_by_drift(ctx.options.allocation, groups):
        scores = drift_per_size(ctx, model, groups, scores)
    return scores


def allocates_by_drift(allocation: str, groups: list[PrunableGroup]) -> bool:
    """Whether Stage 1 ranks `groups` by measured drift (CompressOptions.allocation): with "auto",
    when attention heads compete with channels."""
    return allocation == "drift" or (allocation == "auto" and any(isinstance(g.group, AttentionSite) for g in groups))


def _baseline_head_scores(criterion: str, model: nn.Module, site: AttentionSite) -> torch.Tensor:
    if criterion == "l2":
        return head_weight_norms(model, site)
    if criterion == "taylor":
        return head_taylor(model, site)
    return torch.rand(site.num_heads(model))


def _pruned_copy(ctx: RunContext, model: nn.Module, groups: list[PrunableGroup],
                 scores: list[torch.Tensor], k: int) -> tuple[nn.Module, int]:
    plan = make_plan(groups, scores, k, ctx.options.round_to)
    candidate = copy.deepcopy(model)
    apply_plan(candidate, ctx.example, plan, ctx.unit_means)
    return candidate, planned_units(plan)


def _smallest_step(ctx: RunContext, model: nn.Module, groups: list[PrunableGroup], scores: list[torch.Tensor],
                  full: tuple[nn.Module, int], k: int, enough: Callable[[nn.Module], bool], slack: float = 0.0
                  ) -> tuple[tuple[nn.Module, int], tuple[nn.Module, int] | None]:
    """Bisect the number of removed units for the smallest step that is `enough` (the caller's
    k-unit step `full` is known to be), to within `slack` of the step's size (each try prunes a
    copy of the model and measures it).

    Returns that step and the largest one that is not enough (None if that is the empty step):
    with round_to, one more unit can remove a whole block of channels, and the step just short
    of the target may be the closer one.
    """
    low, high = 0, k
    best = full
    below = None
    while high - low > max(1, int(slack * high)):
        mid = (low + high) // 2
        trial = _pruned_copy(ctx, model, groups, scores, mid)
        if enough(trial[0]):
            high, best = mid, trial
        else:
            low, below = mid, trial
    return best, below


def prune_filters(ctx: RunContext, model: nn.Module, share: float = 1.0) -> tuple[nn.Module, str]:
    """Stage 1 until `share` of the size target is reached, the accuracy budget or T steps.

    The schedule step counter lives in `ctx`, so a later call continues the schedule.
    """
    opts = ctx.options
    total = opts.max_steps
    while ctx.filter_steps < total:
        if ctx.reached(*ctx.measure(model), share=share):
            return model, "target_reached"
        if ctx.out_of_time():
            return model, "time_budget"
        ctx.reporter.check_cancel()
        started = time.monotonic()
        t = ctx.filter_steps
        graph = build_graph(model, ctx.example)
        groups = group_candidates(ctx, model, graph)
        capacity = sum(g.capacity for g in groups)
        if capacity == 0:
            return model, "nothing_left_to_prune"
        scores = _group_scores(ctx, model, graph, groups)
        rho = opts.p0 * (1 + t / total) ** opts.alpha
        k = max(1, min(capacity, math.floor(rho * sum(g.width for g in groups))))
        candidate, removed = _pruned_copy(ctx, model, groups, scores, k)
        while removed == 0 and k < capacity:
            # round_to can round a small step away entirely; grow it until something goes
            k = min(2 * k, capacity)
            candidate, removed = _pruned_copy(ctx, model, groups, scores, k)
        if removed == 0:
            return model, "nothing_left_to_prune"
        if ctx.reached(*ctx.measure(candidate), share=share):
            (candidate, removed), below = _smallest_step(
                ctx, model, groups, scores, (candidate, removed), k,
                lambda trial: ctx.reached(*ctx.measure(trial), share=share))
            if share >= 1.0 and ctx.overshoots(*ctx.measure(candidate)):
                # the smallest step that reaches the target overshoots it (round_to granularity):
                # a step, or no step, that ends within tolerance below the target is closer
                if below is not None and below[1] > 0 and ctx.met(*ctx.measure(below[0])):
                    candidate, removed = below
                elif ctx.met(*ctx.measure(model)):
                    return model, "target_reached"
        ctx.filter_steps += 1
        ctx.recover(candidate, model)
        accuracy = ctx.accuracy(candidate)
        accepted = ctx.within_budget(accuracy)
        macs, params = ctx.measure(candidate)
        ctx.record("filters", macs, params, accuracy, time.monotonic() - started, accepted,
                   units_removed=removed)
        if not accepted:
            return model, "accuracy_budget"
        model = candidate
    return model, "target_reached" if ctx.reached(*ctx.measure(model), share=share) else "max_steps"


def remove_layers(ctx: RunContext, model: nn.Module,
                  on_removed: Callable[[BlockCandidate, float], None]) -> tuple[nn.Module, str]:
    """Stage 2: remove the lowest-divergence blocks while the target is not reached."""
    opts = ctx.options
    candidates = find_blocks(model, ctx.example)
    essential: set[str] = set()
    removed = 0
    while removed < opts.max_removals:
        if ctx.reached(*ctx.measure(model)):
            return model, "target_reached"
        if ctx.out_of_time():
            return model, "time_budget"
        ctx.reporter.check_cancel()
        live = [c for c in candidates if c.name not in essential]
        if not live:
            return model, "no_removable_blocks"
        started = time.monotonic()
        scores = block_divergence(model, {c.name: c.shortcut for c in live}, ctx.calib, ctx.device,
                                  opts.batch_size)
        choice = None
        for block in sorted(live, key=lambda c: scores[c.name]):
            if last_layer_of_its_stack(model, block):
                essential.add(block.name)  # an encoder with no layer left is not a pruned model
                continue
            trial = copy.deepcopy(model)
            remove_block(trial, block)
            if ctx.overshoots(*ctx.measure(trial)):
                essential.add(block.name)  # too big to remove; it only gets bigger relative to the rest
                continue
            choice = block, trial
            break
        if choice is None:
            return model, "no_removable_blocks"
        block, trial = choice
        ctx.recover(trial, model)
        accuracy = ctx.accuracy(trial)
        accepted = ctx.within_budget(accuracy)
        width = _width_alternative(ctx, model, ctx.measure(trial)) \
            if accepted and opts.layers_must_beat_width and "filters" in opts.stages else None
        width_wins = False
        comparison: dict[str, float | str] = {}
        if width is not None:
            ctx.recover(width[0], model)
            width_accuracy = ctx.accuracy(width[0])
            drift, width_drift = ctx.drift(trial), ctx.drift(width[0])
            comparison = {"drift": round(drift, 6), "width_drift": round(width_drift, 6),
                          "width_accuracy": round(width_accuracy, 6), "width_units_removed": width[1]}
            width_wins = ctx.within_budget(width_accuracy) and width_drift < drift
            if width_wins:
                comparison["declined"] = "pruning width to the same size did better"
        macs, params = ctx.measure(trial)
        ctx.record("layers", macs, params, accuracy, time.monotonic() - started, accepted and not width_wins,
                   block=block.name, divergence=round(scores[block.name], 6), **comparison)
        if not accepted:
            essential.add(block.name)
            continue
        if width_wins:
            # Stage 1 goes on from here: the width candidate is as big as the block, which can
            # overshoot the target that Stage 1's own steps stop at
            return model, "width_beats_layers"
        model = trial
        candidates.remove(block)
        removed += 1
        on_removed(block, scores[block.name])
    return model, "max_removals"


def last_layer_of_its_stack(model: nn.Module, block: BlockCandidate) -> bool:
    """Whether `block` is a transformer layer whose stack has no other layer left."""
    if not block.layer:
        return False
    parent = block.name.rpartition(".")[0]
    stack = model.get_submodule(parent) if parent else model
    return sum(not isinstance(layer, SkippedLayer) for layer in stack.children()) <= 1


def _width_alternative(ctx: RunContext, model: nn.Module, size: tuple[int, int]) -> tuple[nn.Module, int] | None:
    """One Stage 1 step from `model` that is no larger than `size` (a block removal's result), with the
    fewest units removed, to compare the removal with; None when width alone cannot get there."""
    graph = build_graph(model, ctx.example)
    groups = group_candidates(ctx, model, graph)
    capacity = sum(g.capacity for g in groups)
    if capacity == 0:
        return None
    scores = _group_scores(ctx, model, graph, groups)
    full = _pruned_copy(ctx, model, groups, scores, capacity)
    if not ctx.no_larger(*ctx.measure(full[0]), than=size):
        return None
    # a few units more than the block's size are as good a comparison, and save tries
    return _smallest_step(ctx, model, groups, scores, full, capacity,
                          lambda trial: ctx.no_larger(*ctx.measure(trial), than=size), slack=0.02)[0]

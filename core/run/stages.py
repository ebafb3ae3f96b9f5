"""Stage 1 (iterative divergence-aware filter pruning) and Stage 2 (block removal)."""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch_pruning as tp
from torch import nn

from core.graph.attention import AttentionSite, find_sites
from core.graph.blocks import BlockCandidate, SkippedLayer, find_blocks, remove_block
from core.importance.divergence import (
    DivergenceScorer,
    GroupScorer,
    attach_filter_divergence,
    baseline_scorer,
    block_divergence,
    direct_consumers,
    taylor_gradients,
)
from core.importance.heads import attach_head_divergence, head_taylor, head_weight_norms
from core.importance.statistics import CalibrationPass, InputStats, attach_linear_inputs
from core.options import Allocation, Criterion, GroupScores, Stage
from core.report import RemovedBlock, StopReason, WidthComparison, Work
from core.run.allocation import drift_per_size
from core.run.context import Run, RunCache, RunInputs, StageState
from core.run.goals import Size
from core.surgery.groups import PrunableGroup, build_graph, prunable_groups
from core.surgery.heads import removable
from core.surgery.plan import make_plan, planned_units, rounded_count, score_groups
from core.surgery.trial import applied, survives_channel_cut
from core.surgery.units import Means, UnitKey, UnitKind


def group_candidates(inputs: RunInputs, cache: RunCache, model: nn.Module,
                     graph: tp.DependencyGraph) -> list[PrunableGroup]:
    """The prunable channel groups and attention-head groups of `model` under the run's ignore
    list and minimum widths."""
    ignored = [model.get_submodule(name) for name in inputs.ignored]
    opts = inputs.options

    def survives(group: PrunableGroup) -> bool:
        if group.key not in cache.cuttable:
            cache.cuttable[group.key] = survives_channel_cut(model, inputs.example, graph, group)
        return cache.cuttable[group.key]

    # one output is the logits, whose layer is ignored; where there are more, any group may reach one
    groups = prunable_groups(graph, model, ignored, cache.original_widths, opts.min_width_fraction,
                             opts.min_channels, survives, check_every_group=len(inputs.outputs) > 1)
    return groups + _head_groups(inputs, cache, model)


def _head_groups(inputs: RunInputs, cache: RunCache, model: nn.Module) -> list[PrunableGroup]:
    groups = []
    for site in find_sites(model)[0]:
        key = UnitKey(UnitKind.HEADS, site.name)
        if any(name in inputs.ignored for name in (site.name, site.out)):
            continue
        if key not in cache.cuttable:
            cache.cuttable[key] = removable(model, site, inputs.example)
        if not cache.cuttable[key]:
            continue
        width = site.num_heads(model)
        original = cache.original_widths.setdefault(key, width)
        minimum = min(width, max(1, math.ceil(original * inputs.options.min_width_fraction)))
        groups.append(PrunableGroup(key, site, width, 1, minimum, rounds=False))
    return groups


@dataclass(frozen=True)
class Scoring:
    """Unit scores of every group, comparable across groups, and (with mean compensation) the
    statistics the consumers and readers of the units compensate with, for the plans made from
    these scores; `graph` is the dependency graph of the model they score."""

    scores: list[torch.Tensor]
    means: Means
    graph: tp.DependencyGraph


def step_scoring(run: Run, model: nn.Module, graph: tp.DependencyGraph, groups: list[PrunableGroup]) -> Scoring:
    """The scores of `groups` by the run's criterion, with the statistics gathered on the same
    calibration pass that the plans made from them compensate with."""
    spec = run.spec
    criterion = spec.options.criterion
    batch = spec.options.batch_size
    sites = [g.group for g in groups if isinstance(g.group, AttentionSite)]
    layer_sum = sums_layer_scores(spec.options.group_scores, heads_compete=bool(sites))
    means: Means = {}
    if criterion == Criterion.DIVERGENCE:
        compensate = spec.options.mean_compensation
        fit = compensate and spec.options.least_squares_compensation
        layer_means: dict[nn.Module, tuple[nn.Module, InputStats]] | None = {} if compensate else None
        head_means: dict[str, InputStats] | None = {} if compensate else None
        consumers = direct_consumers(model, graph, spec.calib[:2].to(spec.device)) if compensate else {}
        # unit scores, head scores and the readers' statistics from one pass over the calibration set
        calibration = CalibrationPass(model)
        filters = attach_filter_divergence(calibration, graph, consumers, means_out=layer_means, with_cov=fit)
        head_scores = attach_head_divergence(calibration, sites, means_out=head_means, with_cov=fit)
        # consumers and output projections get their statistics from the scoring's own hooks
        known = set(consumers.values()) | {model.get_submodule(site.out) for site in sites}
        readers = attach_linear_inputs(calibration, fit, skip=known) if compensate else None
        calibration.run(spec.calib, spec.device, batch)
        channels: GroupScorer = DivergenceScorer(filters(), layer_sum=layer_sum)
        heads = head_scores()
        if layer_means is not None and head_means is not None and readers is not None:
            names = {module: name for name, module in model.named_modules()}
            means = {
                UnitKey(UnitKind.CHANNELS, names[m]): (names[c], mean) for m, (c, mean) in layer_means.items()} | {
                UnitKey(UnitKind.HEADS, site.name): (site.out, head_means[site.name])
                for site in sites if site.name in head_means}
            gathered = {c: stats for c, stats in layer_means.values()} | {
                cast(nn.Linear, model.get_submodule(site.out)): head_means[site.name]
                for site in sites if site.name in head_means}
            means |= {UnitKey(UnitKind.READERS, names[m]): (names[m], stats)
                      for m, stats in (readers() | gathered).items()}
        if layer_sum:
            heads = {name: s / (s.mean() + 1e-12) for name, s in heads.items()}
    else:
        if criterion == Criterion.TAYLOR:
            labels = spec.recovery.y[: len(spec.calib)] if spec.recovery.y is not None else None
            taylor_gradients(model, spec.calib, labels, spec.device, batch, spec.task)
        channels = baseline_scorer(criterion)
        heads = {site.name: _baseline_head_scores(criterion, model, site) for site in sites}

    def score(group: object) -> torch.Tensor | None:
        return heads.get(group.name) if isinstance(group, AttentionSite) else channels(group)

    comparable = (criterion == Criterion.DIVERGENCE and layer_sum) or criterion == Criterion.LAMP
    scores = score_groups(groups, score, normalise=not comparable)
    model.zero_grad(set_to_none=True)  # Taylor's gradients
    if criterion == Criterion.DIVERGENCE and spec.task.smooth_drift and allocates_by_drift(
            spec.options.allocation, groups, large=is_large(spec.goals.original.params)):
        with run.timer(Work.PROBES):
            scores = drift_per_size(run, model, graph, groups, scores, means)
    return Scoring(scores, means, graph)


def sums_layer_scores(group_scores: GroupScores, heads_compete: bool) -> bool:
    """Whether coupled layers' normalised scores are summed (CompressOptions.group_scores): with "auto",
    where attention heads are pruned, whose residual stream averaged scores make look cheap."""
    return group_scores == GroupScores.LAYER_SUM or (group_scores == GroupScores.AUTO and heads_compete)


def allocates_by_drift(allocation: Allocation, groups: list[PrunableGroup], large: bool = False) -> bool:
    """Whether Stage 1 ranks `groups` by measured drift (CompressOptions.allocation): with "auto",
    when attention heads compete with channels, or in a `large` model (is_large: a pretrained
    network, whose narrow layers per-layer normalised scores cut as readily as wide ones)."""
    heads_compete = any(isinstance(g.group, AttentionSite) for g in groups)
    return allocation == Allocation.DRIFT or (allocation == Allocation.AUTO and (heads_compete or large))


# Stage 1 steps accepted in a row at their first try after which a backed-off step size doubles again
GROW_AFTER = 2
# Models with at least this many parameters count as large pretrained networks (README, Decisions):
# between the project's trained-from-scratch examples (digits 0.17 M, the Fashion-MNIST ResNet 0.2 M)
# and ImageNet models (EfficientNet-Lite0 4.6 M).
LARGE_MODEL_PARAMS = 1_000_000


def is_large(params: int) -> bool:
    return params >= LARGE_MODEL_PARAMS


def _baseline_head_scores(criterion: Criterion, model: nn.Module, site: AttentionSite) -> torch.Tensor:
    if criterion == Criterion.TAYLOR:
        return head_taylor(model, site)
    if criterion == Criterion.RANDOM:
        return torch.rand(site.num_heads(model))
    # heads have no BatchNorm, and FPGM's and LAMP's head forms are not in torch-pruning: their magnitude
    return head_weight_norms(model, site)


def pruned_copy(run: Run, model: nn.Module, groups: list[PrunableGroup], scoring: Scoring,
                 k: int, caps: Sequence[int] | None = None) -> tuple[nn.Module, int]:
    plan = make_plan(groups, scoring.scores, k, run.spec.options.round_to, caps)
    # pruned in place through the step's graph and copied, rather than copied and traced again
    with run.timer(Work.SURGERY), applied(model, run.spec.example, scoring.graph, plan, scoring.means):
        candidate = copy.deepcopy(model)
    return candidate, planned_units(plan)


def _smallest_step(run: Run, model: nn.Module, groups: list[PrunableGroup], scoring: Scoring,
                  full: tuple[nn.Module, int], k: int, enough: Callable[[nn.Module], bool], slack: float = 0.0
                  ) -> tuple[tuple[nn.Module, int], tuple[nn.Module, int] | None, int]:
    """Bisect the number of removed units for the smallest step that is `enough` (the caller's
    k-unit step `full` is known to be), to within `slack` of the step's size (each try prunes a
    copy of the model and measures it).

    Returns that step, the largest one that is not enough (None if that is the empty step) and the
    units planned for the latter: with round_to, one more unit can remove a whole block of channels,
    and the step just short of the target may be the closer one.
    """
    low, high = 0, k
    best = full
    below = None
    while high - low > max(1, int(slack * high)):
        mid = (low + high) // 2
        trial = pruned_copy(run, model, groups, scoring, mid)
        if enough(trial[0]):
            high, best = mid, trial
        else:
            low, below = mid, trial
    return best, below, low


def prune_filters(run: Run, model: nn.Module, state: StageState,
                  share: float = 1.0) -> tuple[nn.Module, StageState, StopReason]:
    """Stage 1 until `share` of the size target is reached, the accuracy budget or T steps.

    A step that breaks the accuracy budget is rolled back and tried again from the same model at half
    its size (`state.step_scale` halves, and the later steps keep it), down to
    `min_step_fraction` of the prunable units; only a step of that size that still breaks the budget
    stops the stage. A halved step that rounds back to as many units as the try it halves is skipped,
    not tried again. The schedule's step counter is in `state`, so a later call with the returned
    state continues the schedule.
    """
    spec, goals = run.spec, run.spec.goals
    opts = spec.options
    total = opts.max_steps
    while state.filter_steps < total:
        if goals.reached(run.measure(model), share=share):
            return model, state, StopReason.TARGET_REACHED
        if spec.out_of_time():
            return model, state, StopReason.TIME_BUDGET
        run.reporter.check_cancel()
        started = time.monotonic()
        t = state.filter_steps
        with run.timer(Work.SURGERY):
            graph = build_graph(model, spec.example)
            groups = group_candidates(spec, run.cache, model, graph)
        capacity = sum(g.capacity for g in groups)
        if capacity == 0:
            return model, state, StopReason.NOTHING_LEFT_TO_PRUNE
        with run.timer(Work.SCORING):
            scoring = step_scoring(run, model, graph, groups)
        width = sum(g.width for g in groups)
        smallest = max(1, math.ceil(opts.min_step_fraction * width))
        rho = opts.p0 * (1 + t / total) ** opts.alpha
        rejected: int | None = None
        while True:
            k = min(capacity, max(smallest, math.floor(rho * state.step_scale * width)))
            step = _step_candidate(run, model, groups, scoring, k, capacity, share)
            if step is None:
                return model, state, StopReason.TARGET_REACHED
            candidate, removed = step
            if removed == 0:
                return model, state, StopReason.NOTHING_LEFT_TO_PRUNE
            if rejected is not None and removed >= rejected:
                # round_to (or the target's own step) rounded the halved step back up to the units just
                # rejected: the same cut, which would only be recovered and rejected again
                if k <= smallest:
                    return model, state, StopReason.ACCURACY_BUDGET
                state = dataclasses.replace(state, step_scale=state.step_scale / 2)
                continue
            state, verdict, kept = run.recovered(state, candidate, model)
            accepted = goals.within_budget(verdict)
            state = run.record(state, Stage.FILTERS, run.measure(candidate), verdict, time.monotonic() - started,
                               accepted, recovery_kept=kept, units_removed=removed, step_scale=state.step_scale)
            if accepted:
                break
            if k <= smallest or spec.out_of_time():
                return model, state, StopReason.ACCURACY_BUDGET if k <= smallest else StopReason.TIME_BUDGET
            # back off: half the step, from the same model and scores
            rejected = removed
            state = dataclasses.replace(state, step_scale=state.step_scale / 2, clean_steps=-1)
            started = time.monotonic()
        state = dataclasses.replace(state, filter_steps=state.filter_steps + 1, **_grown(state))
        model = candidate
        run.accepted(model, state)
    reached = goals.reached(run.measure(model), share=share)
    return model, state, StopReason.TARGET_REACHED if reached else StopReason.MAX_STEPS


def _grown(state: StageState) -> dict[str, Any]:
    """The step size after an accepted step: a back-off made early in a run is not kept for good, since
    the model a later step cuts may take larger steps again. After GROW_AFTER steps in a row accepted at
    their first try the scale doubles, up to the schedule's own size; a step that needed a back-off
    (clean_steps -1) starts the count again."""
    clean = state.clean_steps + 1
    if state.step_scale < 1.0 and clean >= GROW_AFTER:
        return {"step_scale": min(1.0, state.step_scale * 2), "clean_steps": 0}
    return {"clean_steps": clean}


def _step_candidate(run: Run, model: nn.Module, groups: list[PrunableGroup], scoring: Scoring, k: int,
                    capacity: int, share: float) -> tuple[nn.Module, int] | None:
    """A copy of `model` with about `k` units removed (grown while round_to rounds it away, cut to the
    fewest units that reach `share` of the target), and the units removed; None when the model is
    already within tolerance of the target and every step would overshoot it."""
    goals = run.spec.goals
    candidate, removed = pruned_copy(run, model, groups, scoring, k)
    while removed == 0 and k < capacity:
        # round_to can round a small step away entirely; grow it until something goes
        k = min(2 * k, capacity)
        candidate, removed = pruned_copy(run, model, groups, scoring, k)
    if removed and goals.reached(run.measure(candidate), share=share):
        def enough(trial: nn.Module) -> bool:
            return goals.reached(run.measure(trial), share=share)

        (candidate, removed), below, k_below = _smallest_step(
            run, model, groups, scoring, (candidate, removed), k, enough)
        if share >= 1.0 and goals.overshoots(run.measure(candidate)):
            # the smallest step that reaches the target overshoots it (round_to granularity):
            # a step, or no step, that ends within tolerance below the target is closer
            if below is not None and below[1] > 0 and goals.met(run.measure(below[0])):
                return below
            landed = _capped_landing(run, model, groups, scoring, k_below, enough)
            if landed is not None:
                return landed
            if goals.met(run.measure(model)):
                return None
    return candidate, removed


def _capped_landing(run: Run, model: nn.Module, groups: list[PrunableGroup], scoring: Scoring, k_below: int,
                    enough: Callable[[nn.Module], bool]) -> tuple[nn.Module, int] | None:
    """A step that reaches the target without overshooting it, when the smallest step that reaches it
    overshoots because its last unit rounded a whole block of a costly group's channels away (a digits model asked
    for -50 % of its MACs landed at -57 %): the `k_below`-unit step, just short of the target, plus the
    next block of one other group, whichever lands within tolerance with the lowest-scoring units. None
    if none does."""
    goals = run.spec.goals
    round_to = run.spec.options.round_to
    short = make_plan(groups, scoring.scores, k_below, round_to)
    base = [len(short.get(g.key, [])) // g.ch_groups for g in groups]
    blocks = []  # (the added units' summed score, group index, units the group then loses)
    for i, group in enumerate(groups):
        more = _next_block(group, base[i], round_to)
        if more is not None:
            blocks.append((float(torch.sort(scoring.scores[i]).values[base[i]: more].sum()), i, more))
    # cheapest block first, and the first that lands is taken: one pruned copy alive at a time
    for _, i, more in sorted(blocks):
        counts = [*base[:i], more, *base[i + 1:]]
        trial = pruned_copy(run, model, groups, scoring, sum(counts), counts)
        if enough(trial[0]) and not goals.overshoots(run.measure(trial[0])):
            return trial
    return None


def _next_block(group: PrunableGroup, removed: int, round_to: int | None) -> int | None:
    """How many of `group`'s units a plan removes when it takes the next whole block after `removed`
    (None when the group has no more to give)."""
    for taken in range(removed + 1, group.capacity + 1):
        count = rounded_count(group.width, taken, group.min_width, round_to if group.rounds else None)
        if count > removed:
            return count
    return None


def remove_layers(run: Run, model: nn.Module, state: StageState,
                  essential: frozenset[str] = frozenset()) -> tuple[nn.Module, StageState, StopReason]:
    """Stage 2: remove the lowest-divergence blocks while the target is not reached; the removed
    blocks are added to the state. `state` and `essential` (blocks found not removable) come from a
    checkpoint when a run resumes inside this stage."""
    spec, goals = run.spec, run.spec.goals
    opts = spec.options
    gone = {block.name for block in state.removed}
    candidates = [c for c in find_blocks(model, spec.example) if c.name not in gone]
    kept = set(essential)  # blocks not to try again
    while len(state.removed) < opts.max_removals:
        if goals.reached(run.measure(model)):
            return model, state, StopReason.TARGET_REACHED
        if spec.out_of_time():
            return model, state, StopReason.TIME_BUDGET
        run.reporter.check_cancel()
        live = [c for c in candidates if c.name not in kept]
        if not live:
            return model, state, StopReason.NO_REMOVABLE_BLOCKS
        started = time.monotonic()
        with run.timer(Work.SCORING):
            scores = block_divergence(model, live, spec.calib, spec.device, opts.batch_size)
        choice = None
        for block in sorted(live, key=lambda c: scores[c.name]):
            if last_layer_of_its_stack(model, block):
                kept.add(block.name)  # an encoder with no layer left is not a pruned model
                continue
            with run.timer(Work.SURGERY):
                trial = copy.deepcopy(model)
                remove_block(trial, block)
            if goals.overshoots(run.measure(trial)):
                kept.add(block.name)  # too big to remove; it only gets bigger relative to the rest
                continue
            choice = block, trial
            break
        if choice is None:
            return model, state, StopReason.NO_REMOVABLE_BLOCKS
        block, trial = choice
        state, verdict, recovery_kept = run.recovered(state, trial, model)
        accepted = goals.within_budget(verdict)
        width = _width_alternative(run, model, run.measure(trial)) \
            if accepted and opts.layers_must_beat_width and Stage.FILTERS in opts.stages else None
        comparison = None
        if width is not None:
            state, width_verdict, _ = run.recovered(state, width[0], model)
            drift, width_drift = run.drift(trial), run.drift(width[0])
            wins = goals.within_budget(width_verdict) and width_drift < drift
            comparison = WidthComparison(
                drift=round(drift, 6), width_drift=round(width_drift, 6),
                width_accuracy=round(width_verdict.accuracy, 6), width_units_removed=width[1],
                declined="pruning width to the same size did better" if wins else None)
        width_wins = comparison is not None and comparison.declined is not None
        state = run.record(state, Stage.LAYERS, run.measure(trial), verdict, time.monotonic() - started,
                           accepted and not width_wins, recovery_kept=recovery_kept, block=block.name,
                           divergence=round(scores[block.name], 6), comparison=comparison)
        if not accepted:
            kept.add(block.name)
            continue
        if width_wins:
            # Stage 1 goes on from here: the width candidate is as big as the block, which can
            # overshoot the target that Stage 1's own steps stop at
            return model, state, StopReason.WIDTH_BEATS_LAYERS
        model = trial
        candidates.remove(block)
        state = dataclasses.replace(state, removed=(
            *state.removed, RemovedBlock(name=block.name, kind=block.kind, divergence=round(scores[block.name], 6))))
        run.accepted(model, state, frozenset(kept))
    return model, state, StopReason.MAX_REMOVALS


def last_layer_of_its_stack(model: nn.Module, block: BlockCandidate) -> bool:
    """Whether `block` is a transformer layer whose stack has no other layer left."""
    if not block.layer:
        return False
    parent = block.name.rpartition(".")[0]
    stack = model.get_submodule(parent) if parent else model
    return sum(not isinstance(layer, SkippedLayer) for layer in stack.children()) <= 1


def _width_alternative(run: Run, model: nn.Module, size: Size) -> tuple[nn.Module, int] | None:
    """One Stage 1 step from `model` that is no larger than `size` (a block removal's result), with the
    fewest units removed, to compare the removal with; None when width alone cannot get there."""
    goals = run.spec.goals
    with run.timer(Work.SURGERY):
        graph = build_graph(model, run.spec.example)
        groups = group_candidates(run.spec, run.cache, model, graph)
    capacity = sum(g.capacity for g in groups)
    if capacity == 0:
        return None
    with run.timer(Work.SCORING):
        scoring = step_scoring(run, model, graph, groups)
    full = pruned_copy(run, model, groups, scoring, capacity)
    if not goals.no_larger(run.measure(full[0]), than=size):
        return None
    # a few units more than the block's size are as good a comparison, and save tries
    return _smallest_step(run, model, groups, scoring, full, capacity,
                          lambda trial: goals.no_larger(run.measure(trial), than=size), slack=0.02)[0]

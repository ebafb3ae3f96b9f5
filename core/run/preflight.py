"""Preflight: what a compression job would face, in seconds and without pruning anything.

It sizes the model, lists what the dependency graph can and cannot prune, finds the
removable blocks, computes the largest reduction the width floors allow, says whether the
target is feasible, and estimates the job's time from a measured training step.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from core.data import Dataset
from core.graph.attention import AttentionSite
from core.graph.blocks import find_blocks
from core.graph.outputs import named_outputs
from core.options import CompressOptions, Stage, Target
from core.progress import Reporter
from core.recovery.distill import freeze_norms
from core.report import (
    BlockRow,
    Estimate,
    GroupRow,
    InputSignature,
    NotPrunableRow,
    OutputRow,
    PreflightReport,
    Work,
)
from core.run.context import Run, RunCache, RunInputs
from core.run.eta import BACKOFF_ALLOWANCE, SQUARE, schedule_steps, size_exponent, target_goal
from core.run.goals import budget_resolution
from core.run.pipeline import _prepare, out_of_reach, reachable_reduction, start_run
from core.run.stages import group_candidates, is_large, pruned_copy, step_scoring
from core.surgery.groups import ROOT_TYPES, PrunableGroup, build_graph

# Without a GPU to measure, GPU time is CPU time over this factor (a mid-size CNN on one
# data-centre GPU against one CPU core, in our runs); the report says when it was assumed.
ASSUMED_GPU_SPEEDUP = 20.0
_LISTED = 50
_TIMED_ITERATIONS = 2
_EXPORT_TRACES = 3


def preflight(model: nn.Module, data: Dataset, target: Target | None, options: CompressOptions,
              has_data: bool = True) -> PreflightReport:
    options.validate()
    if target is not None:
        target.validate()
    started = time.monotonic()
    model, inputs, notes = _prepare(model, data, options, Reporter(None, None))
    prepare_s = time.monotonic() - started  # the job prepares the model and data the same way
    cache = RunCache()
    original = cache.measure(model, inputs.example)
    begin = time.monotonic()
    graph = build_graph(model, inputs.example)
    trace_s = time.monotonic() - begin  # the ONNX export traces the model too (see _export_seconds)
    groups = group_candidates(inputs, cache, model, graph)
    blocks = find_blocks(model, inputs.example) if Stage.LAYERS in options.stages else []
    reachable = reachable_reduction(inputs, cache, original, model)
    problems = _problems(target, reachable, options, groups, blocks)
    signature = [InputSignature(name=s.name, dtype=s.dtype_name, shape=list(s.shape)) for s in inputs.example.signature]
    with torch.no_grad():
        outputs = inputs.example.call(model)
    budget = (target or Target(macs_reduction=0.5)).with_budget(inputs.task.default_budget).budget
    metric = inputs.task.metric(inputs.evaluation.labeled if has_data else False)
    return PreflightReport(
        macs=original.macs,
        params=original.params,
        task=inputs.task.task,
        task_reason=inputs.task_reason,
        metric=metric,
        budget=metric.describe_budget(budget),
        num_classes=inputs.task.num_classes(outputs),
        inputs=signature,
        outputs=[OutputRow(name=name, shape=list(tensor.shape[1:])) for name, tensor in named_outputs(outputs).items()],
        input_shape=list(signature[0].shape),
        input_dtype=signature[0].dtype,
        samples=len(data) if has_data else 0,
        labeled=data.labeled if has_data else None,
        prunable_groups=[GroupRow(name=str(g.key), width=g.width, min_width=g.min_width) for g in groups],
        not_prunable=_not_prunable(model, graph, groups, inputs.ignored, options.ignored_layers),
        blocks=[BlockRow(name=b.name, kind=b.kind) for b in blocks],
        reachable_reduction={key: round(value, 4) for key, value in reachable.items()},
        target=target,
        feasible=None if target is None else not problems,
        problems=problems,
        estimate_seconds=_estimate(inputs, cache, model, target, groups, len(blocks), prepare_s, trace_s),
        budget_resolution=budget_resolution(budget, len(inputs.evaluation), options.eval_fraction, metric)
        if has_data else None,
        notes=notes,
        seconds=round(time.monotonic() - started, 3),
    )


def _problems(target: Target | None, reachable: dict[str, float], options: CompressOptions,
              groups: list, blocks: list) -> list[str]:
    problems = []
    if not groups and not blocks:
        problems.append("Nothing in this model can be pruned: no prunable channel group and no removable block.")
    if target is not None:
        problems += [error.message for error in out_of_reach(target, reachable, options)]
    return problems


def _not_prunable(model: nn.Module, graph: tp.DependencyGraph, groups: list, ignored: list[str],
                  by_option: tuple[str, ...]) -> list[NotPrunableRow]:
    """Layers with weights whose output width stays as it is, and why."""
    in_groups = {dep.target.module for g in groups if not isinstance(g.group, AttentionSite) for dep, _ in g.group
                 if graph.is_out_channel_pruning_fn(dep.handler)}
    # q/k/v projections lose whole heads (the "heads:" groups), not single channels
    by_heads = {f"{g.group.name}.{attr}" for g in groups if isinstance(g.group, AttentionSite) for attr in g.group.qkv}
    rows = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if not own or module in in_groups or name in by_heads:
            continue
        if name in ignored:
            reason = "left alone by ignored_layers" if name in by_option else "output layer (its outputs are classes)"
        elif module not in graph.module2node:
            reason = "not reached by the traced forward pass (unused, or hidden inside a custom operation)"
        elif graph.get_pruner_of_module(module) is None:
            reason = f"custom module {type(module).__name__}: its weights are kept as they are"
        elif isinstance(module, ROOT_TYPES):
            reason = "width coupled with a reshape, channel shuffle or attention heads that cannot be resized"
        else:
            continue  # norms and embeddings follow the groups they belong to
        rows.append(NotPrunableRow(name=name, type=type(module).__name__, reason=reason))
    return rows[:_LISTED]


def _estimate(inputs: RunInputs, cache: RunCache, model: nn.Module, target: Target | None,
              groups: list[PrunableGroup], n_blocks: int, prepare_s: float, trace_s: float) -> Estimate:
    """Job time from one Stage 1 step of the real schedule measured on the run's device: scoring, the
    plan applied to a copy, recovery iterations (with their teacher, feature taps and augmentation)
    and the held-out evaluation, each timed on part of its data and scaled to all of it; plus the
    baseline's and the end's ONNX export, check and latency runs, and the final recovery."""
    opts = inputs.options
    goal = 0.5 if target is None else max(target.macs_reduction or 0.0, target.params_reduction or 0.0)
    budget = (target or Target()).with_budget(inputs.task.default_budget).budget
    step = _measure_step(inputs, cache, model, groups, Target(macs_reduction=goal, max_accuracy_drop=budget)) \
        if groups else None
    iteration_s = step.iteration_s if step is not None else _iteration_seconds(inputs, cache, model)
    eval_s = step.eval_s if step is not None else _eval_seconds(inputs, model)
    export_s = _export_seconds(inputs, eval_s, trace_s)
    # a recovered step is evaluated before its recovery and after it (Run.recovered)
    per_step = (step.score_s + step.apply_s if step is not None else 0.0) + \
        inputs.recovery_iterations() * iteration_s + (2 if inputs.recovery_iterations() else 1) * eval_s
    filters = Stage.FILTERS in opts.stages and bool(groups)
    halvings = _halvings(opts, step.drop if step is not None else 0.0, budget)
    exponent, scale = (step.exponent if step is not None else SQUARE), 0.5**halvings
    share = target_goal(opts, goal, n_blocks)
    first = schedule_steps(opts, share, scale=scale, exponent=exponent) if filters else 0
    filter_steps = halvings + first
    if filters and (halvings or _spends_budget(model, step, filter_steps, budget)):
        # a run the budget ends rather than the target (EfficientNet-Lite0 and PP-OCRv4 on a few hundred
        # crops) backs off through each size down to the smallest step, passing about one step at each (9
        # and 10 tries where the schedule alone counted 2)
        filter_steps = max(filter_steps, 2 * _most_halvings(opts) + 1)
    if filters and Stage.LAYERS in opts.stages and n_blocks:
        # Stage 1 lands on its share of the target (its last step cut to fit) and, after Stage 2, goes on
        # from there to the target: 5 and 3 steps on the digits example, where one pass of the schedule
        # to the target counted 5 (Stage 2's own removals are left out: it declines about as many as it
        # keeps)
        filter_steps += schedule_steps(opts, goal, reached=share, t0=first, scale=scale, exponent=exponent)
    # a Stage 2 trial is a removal and its recovery, and with layers_must_beat_width a width step's too
    trial_steps = (2 if opts.layers_must_beat_width and Stage.FILTERS in opts.stages else 1) \
        if Stage.LAYERS in opts.stages else 0
    trials = min(n_blocks, opts.max_removals)
    fixed = prepare_s + 2 * export_s + 3 * eval_s + (step.score_s if step is not None else 0.0) + \
        inputs.recovery_iterations(final=True) * iteration_s
    # the stages stop at the time budget, and the run then finishes: final recovery and export
    budget_s = float("inf") if opts.time_budget_s is None else opts.time_budget_s
    central = fixed + min(per_step * (filter_steps + trial_steps * min(trials, 1)), budget_s)
    low = fixed + min(per_step * max(filter_steps, 1 if groups or trials else 0), budget_s)
    high = fixed + min(per_step * (filter_steps + 2 * BACKOFF_ALLOWANCE + trial_steps * trials), budget_s + per_step)
    on_gpu = inputs.device.type == "cuda"
    cpu_factor, gpu_factor = (ASSUMED_GPU_SPEEDUP, 1.0) if on_gpu else (1.0, 1 / ASSUMED_GPU_SPEEDUP)
    return Estimate(
        cpu=round(central * cpu_factor, 1),
        gpu=round(central * gpu_factor, 1),
        measured_on=inputs.device.type,
        steps=filter_steps + trial_steps * min(trials, 1),
        train_step_s=round(iteration_s, 5),
        low_s=round(low, 1),
        high_s=round(high, 1),
        step_s=round(per_step, 3),
        recovery_iterations=inputs.recovery_iterations(),
        final_recovery_iterations=inputs.recovery_iterations(final=True),
    )


def _halvings(opts: CompressOptions, drop: float, budget: float) -> int:
    """How often the first step is expected to be halved (CompressOptions.min_step_fraction): until its
    drop before recovery, taken to shrink with its size, fits the budget."""
    if drop <= budget:
        return 0
    return min(math.ceil(math.log2(drop / max(budget, 1e-3))), _most_halvings(opts))


def _spends_budget(model: nn.Module, step: _StepTimes | None, steps: int, budget: float) -> bool:
    """Whether the schedule's steps, each costing what the first costs before recovery, would spend more
    than the budget in a large pretrained model, whose recovery at its low rate gives little back (README,
    Decisions); a small model's recovery at the method's rate wins most of a step back."""
    return step is not None and is_large(sum(p.numel() for p in model.parameters())) and step.drop * steps > budget


def _most_halvings(opts: CompressOptions) -> int:
    """Halvings from the schedule's first step down to the smallest (CompressOptions.min_step_fraction)."""
    return max(math.ceil(math.log2(opts.p0 / opts.min_step_fraction)), 0)


@dataclass(frozen=True)
class _StepTimes:
    score_s: float  # scoring the units on the whole calibration set
    apply_s: float  # one plan applied to a copy and measured
    iteration_s: float  # one recovery iteration
    drop: float  # what the schedule's first step costs before recovery, in the measure that decides the budget
    eval_s: float  # one pass over the held-out split
    exponent: float  # how the size follows the kept width in that step (core.run.eta.size_exponent)


def _measure_step(inputs: RunInputs, cache: RunCache, model: nn.Module, groups: list[PrunableGroup],
                  target: Target) -> _StepTimes:
    """One Stage 1 step as the run makes it, on a copy: scores from one calibration batch (scaled to all
    of them), the schedule's first step applied, and recovery iterations of it timed after a warm-up."""
    opts = inputs.options
    batch = opts.batch_size
    reporter = Reporter(None, None)
    run = start_run(model, dataclasses.replace(inputs, calib=inputs.calib[:batch]), cache, target, reporter,
                    time.monotonic())
    begin, once_before = time.perf_counter(), _timed(run, _ONCE_A_STEP)
    graph = build_graph(model, inputs.example)
    scoring = step_scoring(run, model, graph, groups)
    # only the calibration pass runs over every batch; building the groups, drift allocation's probes and
    # their measurements run once a step and count as measured. (Scaling the whole of it by the batches
    # counted EfficientNet-Lite0's scoring at 14 s a step, where its run spends 6.)
    once = _timed(run, _ONCE_A_STEP) - once_before
    score_s = (time.perf_counter() - begin - once) * -(-len(inputs.calib) // batch) + once
    width = sum(g.width for g in groups)
    begin = time.perf_counter()
    candidate, removed = pruned_copy(run, model, groups, scoring, max(1, math.floor(opts.p0 * width)))
    size = run.measure(candidate)
    apply_s = time.perf_counter() - begin
    goals, verdict = run.spec.goals, run.spec.verdict(candidate)
    drop = goals.drop(verdict) if goals.resolution.resolved else goals.soft_agreement - verdict.soft_agreement
    fractions = goals.fractions
    exponent = size_exponent(removed / width, goals.reductions(size)[max(fractions, key=fractions.__getitem__)])
    return _StepTimes(score_s, apply_s, _timed_iterations(run, candidate, model), drop, run.clock.eval_s, exponent)


# the work of scoring a step that does not run per calibration batch
_ONCE_A_STEP = (Work.PROBES, Work.SURGERY, Work.EVALUATION)


def _timed(run: Run, works: tuple[Work, ...]) -> float:
    return sum(run.timer.seconds.get(work, 0.0) for work in works)


def _iteration_seconds(inputs: RunInputs, cache: RunCache, model: nn.Module) -> float:
    """One recovery iteration of the model itself (nothing to prune: no step to measure)."""
    run = start_run(model, inputs, cache, Target(macs_reduction=0.5), Reporter(None, None), time.monotonic())
    return _timed_iterations(run, model, model)


def _timed_iterations(run: Run, student: nn.Module, teacher: nn.Module) -> float:
    """One recovery iteration's forward and backward passes: the teacher's and the student's forward on an
    augmented batch (as recovery augments it), the student's backward and an AdamW-like update of its
    parameters, timed after a warm-up. Not a real optimizer: creating one imports torch._dynamo, seconds
    that a service's preflight (answering an upload) should not pay."""
    spec = run.spec
    student = copy.deepcopy(student).train(spec.task.train_mode)
    if spec.frozen_norms:
        freeze_norms(student)
    batch = spec.recovery.inputs[: spec.options.batch_size].to(spec.device)
    generator = torch.Generator().manual_seed(spec.options.seed)
    parameters = [p for p in student.parameters() if p.requires_grad]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in parameters]
    timings = []
    for _ in range(1 + _TIMED_ITERATIONS):  # the first pass pays for allocation and kernel selection
        begin = time.perf_counter()
        x = batch if spec.augment is None else spec.augment(batch, generator)
        opts = spec.options
        spec.task.recovery_loss(student, teacher, x, None, opts.kd_temperature, opts.kd_weight).backward()
        with torch.no_grad():
            for parameter, (average, square) in zip(parameters, moments):  # what AdamW's step does per tensor
                grad = parameter.grad if parameter.grad is not None else average
                average.mul_(0.9).add_(grad, alpha=0.1)
                square.mul_(0.999).addcmul_(grad, grad, value=0.001)
                parameter.mul_(1.0).addcdiv_(average, square.sqrt().add_(1e-8), value=0.0)
        student.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - begin)
    return statistics.median(timings[1:])


def _eval_seconds(inputs: RunInputs, model: nn.Module) -> float:
    begin = time.perf_counter()
    inputs.verdict(model)
    return time.perf_counter() - begin


def _export_seconds(inputs: RunInputs, eval_s: float, trace_s: float) -> float:
    """What the run spends on the original's ONNX export, check and latency runs, and again on the pruned
    model's: the export at _EXPORT_TRACES of the dependency graph's trace (`trace_s`; exporting traces
    the model and then converts and checks the graph, and timing a real export here cost the preflight
    seconds), the check on up to 64 held-out samples and the latency runs at the inference time per
    sample of the held-out pass (`eval_s`)."""
    per_sample = eval_s / max(len(inputs.evaluation), 1)
    latency = inputs.options.latency_runs * (1 + inputs.options.latency_batch) * per_sample
    return _EXPORT_TRACES * trace_s + latency + min(len(inputs.evaluation), 64) * per_sample

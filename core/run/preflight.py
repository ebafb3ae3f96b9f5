"""Preflight: what a compression job would face, in seconds and without pruning anything.

It sizes the model, lists what the dependency graph can and cannot prune, finds the
removable blocks, computes the largest reduction the width floors allow, says whether the
target is feasible, and estimates the job's time from a measured training step.
"""

from __future__ import annotations

import copy
import time

import torch
import torch_pruning as tp
from torch import nn

from core.data import Dataset
from core.graph.attention import AttentionSite
from core.graph.blocks import find_blocks
from core.graph.outputs import named_outputs, select_output
from core.options import CompressOptions, Stage, Target
from core.progress import Reporter
from core.recovery.distill import iterations_for
from core.report import BlockRow, Estimate, GroupRow, InputSignature, NotPrunableRow, OutputRow, PreflightReport
from core.run.context import RunCache, RunInputs
from core.run.pipeline import _prepare, out_of_reach, reachable_reduction
from core.run.stages import group_candidates
from core.surgery.groups import ROOT_TYPES, build_graph

# Without a GPU to measure, GPU time is CPU time over this factor (a mid-size CNN on one
# data-centre GPU against one CPU core, in our runs); the report says when it was assumed.
ASSUMED_GPU_SPEEDUP = 20.0
_LISTED = 50


def preflight(model: nn.Module, data: Dataset, target: Target | None, options: CompressOptions,
              has_data: bool = True) -> PreflightReport:
    options.validate()
    if target is not None:
        target.validate()
    started = time.monotonic()
    model, inputs, notes = _prepare(model, data, options, Reporter(None, None))
    cache = RunCache()
    original = cache.measure(model, inputs.example)
    graph = build_graph(model, inputs.example)
    groups = group_candidates(inputs, cache, model, graph)
    blocks = find_blocks(model, inputs.example) if Stage.LAYERS in options.stages else []
    reachable = reachable_reduction(inputs, cache, original, model)
    problems = _problems(target, reachable, options, groups, blocks)
    signature = [InputSignature(name=s.name, dtype=s.dtype_name, shape=list(s.shape)) for s in inputs.example.signature]
    with torch.no_grad():
        outputs = inputs.example.call(model)
    num_classes = int(select_output(outputs, options.output).shape[1])
    return PreflightReport(
        macs=original.macs,
        params=original.params,
        num_classes=num_classes,
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
        estimate_seconds=_estimate(inputs, model, target, len(blocks)),
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


def _estimate(inputs: RunInputs, model: nn.Module, target: Target | None, n_blocks: int) -> Estimate:
    """Job time from one measured training and inference step on the run's device."""
    opts = inputs.options
    train_s, infer_s = _step_seconds(inputs, model)
    per_recovery = iterations_for(len(inputs.recovery), opts.batch_size, opts.recovery_epochs,
                                  opts.recovery_iterations) * (train_s + infer_s)
    passes = -(-len(inputs.calib) // opts.batch_size) + -(-len(inputs.evaluation) // opts.batch_size)
    per_step = passes * infer_s + per_recovery
    goal = 0.5 if target is None else max(target.macs_reduction or 0.0, target.params_reduction or 0.0)
    steps = (_filter_steps(opts, goal) if Stage.FILTERS in opts.stages else 0) + (
        min(n_blocks, opts.max_removals) if Stage.LAYERS in opts.stages else 0)
    final = iterations_for(len(inputs.recovery), opts.batch_size, opts.final_recovery_epochs,
                           opts.final_recovery_iterations) * (train_s + infer_s)
    total = steps * per_step + final
    on_gpu = inputs.device.type == "cuda"
    return Estimate(
        cpu=round(total * (ASSUMED_GPU_SPEEDUP if on_gpu else 1.0), 1),
        gpu=round(total if on_gpu else total / ASSUMED_GPU_SPEEDUP, 1),
        measured_on=inputs.device.type,
        steps=steps,
        train_step_s=round(train_s, 5),
    )


def _filter_steps(opts: CompressOptions, goal: float) -> int:
    """Stage 1 steps the schedule needs to remove `goal` of the MACs, taking MACs to fall with the
    square of the kept width (both sides of most layers shrink)."""
    share = goal * (opts.filter_share if Stage.LAYERS in opts.stages else 1.0)
    kept = 1.0
    for t in range(opts.max_steps):
        kept *= 1.0 - opts.p0 * (1 + t / opts.max_steps) ** opts.alpha
        if 1.0 - kept**2 >= share:
            return t + 1
    return opts.max_steps


def _step_seconds(inputs: RunInputs, model: nn.Module) -> tuple[float, float]:
    student = copy.deepcopy(model).train()
    batch = inputs.recovery.inputs[: inputs.options.batch_size].to(inputs.device)
    parameters = [p for p in student.parameters() if p.is_floating_point()]
    timings = []
    for _ in range(2):  # the first step pays for allocation and kernel selection
        begin = time.perf_counter()
        select_output(batch.call(student), inputs.options.output).float().logsumexp(1).mean().backward()
        for p in parameters:
            p.grad = None
        timings.append(time.perf_counter() - begin)
    model.eval()
    with torch.no_grad():
        begin = time.perf_counter()
        batch.call(model)
        infer = time.perf_counter() - begin
    return timings[-1], infer

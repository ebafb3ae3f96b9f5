"""`compress`: the one entry point the CLI and the worker call."""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from core.accel import resolve_precision
from core.data import Dataset, split
from core.errors import OptionsError, TargetUnreachableError
from core.export.artifacts import export_onnx, export_pt2, verify_onnx
from core.export.spec import OnnxSpec
from core.graph.attention import convert_multihead_attention, find_sites, holds_attention
from core.graph.blocks import find_blocks, remove_block
from core.graph.detectors import as_tensor_model, one_image_per_call
from core.graph.outputs import named_outputs
from core.graph.predictors import output_layers
from core.importance.divergence import filter_divergence
from core.inputs import Inputs
from core.measure.latency import ort_latency_ms
from core.options import CompressOptions, Stage, Target
from core.progress import CancelFn, ProgressFn, Reporter
from core.recovery.augment import choose_augmenter
from core.recovery.distill import freezes_norms
from core.recovery.features import pick_feature_points
from core.report import HeadRow, Latency, LayerRow, Report, StopReason, Work
from core.run.checkpoint import Checkpoint, CheckpointFn, Phase, Saver
from core.run.context import Run, RunCache, RunInputs, RunSpec, StageState
from core.run.goals import TARGET_TOLERANCE, Goals, Size, Verdict, budget_resolution, reductions
from core.run.phases import PhaseTimer, peak_rss_mb
from core.run.stages import group_candidates, is_large, last_layer_of_its_stack, prune_filters, remove_layers
from core.surgery.apply import apply_plan
from core.surgery.groups import build_graph
from core.surgery.plan import make_plan
from core.surgery.units import UnitKind
from core.tasks.base import collect
from core.tasks.check import settle_task


@dataclass
class Result:
    model: nn.Module
    report: Report
    artifacts: dict[str, Path]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionsError("CUDA was requested but no CUDA device is available.", hint="Use --device cpu or auto.")
    device = torch.device(name)
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise OptionsError(f"There is no CUDA device {device.index}: this machine has {torch.cuda.device_count()}.",
                           hint=f"Use cuda:0 to cuda:{torch.cuda.device_count() - 1}, cuda, or auto.")
    return device


def _drop_training_only_heads(model: nn.Module) -> list[str]:
    """Auxiliary classifiers (GoogLeNet, Inception v3) run only in training mode; the dependency
    graph is traced in eval mode and cannot keep them consistent, and inference never uses them."""
    if not getattr(model, "aux_logits", False):
        return []
    model.aux_logits = False  # type: ignore[assignment]  # a plain bool attribute, not a tensor or module
    dropped = [name for name in ("aux1", "aux2", "AuxLogits") if getattr(model, name, None) is not None]
    for name in dropped:
        setattr(model, name, None)
    return [f"Removed training-only auxiliary head {name}." for name in dropped]


DEFAULT_LR = 1e-3
TRANSFORMER_LR = 1e-4
# A large pretrained CNN (stages.is_large): at 1e-3 and 1e-4, AdamW's steps undid EfficientNet-Lite0's
# ImageNet training within 40 iterations on 240 crops (README, Decisions).
PRETRAINED_LR = 1e-5


def _uncut_notes(cache: RunCache) -> list[str]:
    """Channel groups left whole because removing one channel breaks the model or changes an output."""
    uncut = [key.name for key, cuttable in cache.cuttable.items() if not cuttable and key.kind is UnitKind.CHANNELS]
    if not uncut:
        return []
    shown = ", ".join(uncut[:6]) + (", ..." if len(uncut) > 6 else "")
    return [f"{len(uncut)} channel group(s) were left unpruned: removing one of their channels breaks the model or "
            f"changes an output's shape (a reshape into fixed-size attention heads or to a computed hidden size, "
            f"an output's width): {shown}."]


def _recovery_notes(inputs: RunInputs) -> list[str]:
    notes = []
    if inputs.augment is not None:
        notes.append(f"Recovery fine-tuned on augmented batches ({inputs.augment.describe()}); scoring and the "
                     "held-out evaluation used the data as it is.")
    if inputs.frozen_norms:
        notes.append(f"Recovery kept the BatchNorm statistics as they were ({len(inputs.recovery)} recovery samples: "
                     "a batch's statistics would stand in for the population's); norm_statistics=update trains them.")
    return notes


def _undone_notes(state: StageState) -> list[str]:
    undone = sum(step.recovery_kept is False for step in state.steps)
    if not undone:
        return []
    recovered = sum(step.recovery_kept is not None for step in state.steps)
    return [f"Recovery was undone after {undone} of {recovered} steps: it left the held-out measure worse than the "
            "step's surgery and compensation alone. Where most steps undo it, a lower lr may let it help."]


def _attention_notes(model: nn.Module) -> list[str]:
    _, unrecognised = find_sites(model)
    if not unrecognised:
        return []
    shown = "; ".join(unrecognised[:3]) + (f"; and {len(unrecognised) - 3} more" if len(unrecognised) > 3 else "")
    return [f"Attention heads are not pruned in {len(unrecognised)} module(s) this version does not recognise "
            f"({shown}); the widths around them (MLP, hidden size) are pruned."]


@torch.no_grad()
def _output_names(model: nn.Module, example: Inputs) -> tuple[str, ...]:
    return tuple(named_outputs(example.call(model.eval())))


def reachable_reduction(inputs: RunInputs, cache: RunCache, original: Size, model: nn.Module) -> dict[str, float]:
    """Largest reduction from the `original` size the minimum-width rules (and block removal) allow."""
    floor = copy.deepcopy(model)
    if Stage.FILTERS in inputs.options.stages:
        graph = build_graph(floor, inputs.example)
        groups = group_candidates(inputs, cache, floor, graph)
        scores = [torch.zeros(g.width) for g in groups]
        plan = make_plan(groups, scores, sum(g.capacity for g in groups), inputs.options.round_to)
        apply_plan(floor, inputs.example, plan)
    if Stage.LAYERS in inputs.options.stages:
        for block in find_blocks(floor, inputs.example):
            if not last_layer_of_its_stack(floor, block):
                remove_block(floor, block)
    return reductions(cache.measure(floor, inputs.example), original)


def out_of_reach(target: Target, reachable: dict[str, float], options: CompressOptions) -> list[TargetUnreachableError]:
    """One error per size goal beyond the reachable reduction (within the target tolerance)."""
    errors = []
    for key, goal in (("macs", target.macs_reduction), ("params", target.params_reduction)):
        if goal is not None and goal > reachable[key] + TARGET_TOLERANCE:
            errors.append(TargetUnreachableError(
                f"A {goal:.0%} {'MACs' if key == 'macs' else 'params'} reduction is out of reach: at most "
                f"{reachable[key]:.0%} can be removed with stages {','.join(options.stages)} and "
                f"min_width_fraction {options.min_width_fraction}.",
                hint=f"Ask for at most {reachable[key]:.2f}, or lower the minimum width.",
            ))
    return errors


def _check_reachable(inputs: RunInputs, cache: RunCache, original: Size, target: Target,
                     model: nn.Module) -> dict[str, float]:
    """Refuse targets beyond the reachable reduction before any work."""
    reachable = reachable_reduction(inputs, cache, original, model)
    errors = out_of_reach(target, reachable, inputs.options)
    if errors:
        raise errors[0]
    return reachable


def _layer_table(original: nn.Module, pruned: nn.Module, divergence: dict[str, float]) -> list[LayerRow]:
    after = dict(pruned.named_modules())
    rows = []
    for name, module in original.named_modules():
        if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            continue
        width = module.out_channels if isinstance(module, nn.modules.conv._ConvNd) else module.out_features
        new = after.get(name)
        new_width = 0
        if isinstance(new, nn.modules.conv._ConvNd):
            new_width = new.out_channels
        elif isinstance(new, nn.Linear):
            new_width = new.out_features
        rows.append(LayerRow(name=name, channels_before=width, channels_after=new_width,
                             divergence=divergence.get(name)))
    return rows


def _head_table(original: nn.Module, pruned: nn.Module) -> list[HeadRow]:
    """Heads per recognised attention module before and after (0 when its layer was removed)."""
    after = {site.name: site.num_heads(pruned) for site in find_sites(pruned)[0]}
    return [HeadRow(name=site.name, heads_before=site.num_heads(original), heads_after=after.get(site.name, 0))
            for site in find_sites(original)[0]]


def _onnx_metrics(timer: PhaseTimer, model: nn.Module, example: Inputs, path: Path, verify_on: Inputs,
                  opts: CompressOptions, spec: OnnxSpec | None) -> tuple[float, Latency]:
    with timer(Work.EXPORT):
        export_onnx(model, example, path, spec)
        diff = verify_onnx(model, path, verify_on)
    # a detector's export takes one image (core.graph.detectors)
    batches = (1,) if one_image_per_call(model) else (1, opts.latency_batch)
    with timer(Work.LATENCY):
        latency = ort_latency_ms(path, example, batches, opts.latency_runs)
    return diff, latency


def compress(
    model: nn.Module,
    data: Dataset,
    target: Target,
    options: CompressOptions | None = None,
    out_dir: Path | str = "idap-out",
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    *,
    onnx_spec: OnnxSpec | None = None,
    checkpoint: CheckpointFn | None = None,
    resume: Checkpoint | None = None,
) -> Result:
    """Prune `model` towards `target` and write model.onnx, model.pt2 and report.json to `out_dir`.

    The caller's model is not modified. Raises UserError subclasses for problems the
    caller can fix, and Cancelled when `should_cancel()` turns True. `onnx_spec` gives the
    ONNX exports the names, dtype and dynamic axes of a model that came in as ONNX.
    `checkpoint` is called after every accepted step (core.run.checkpoint); `resume`, one such
    checkpoint of the same model, data, target and options, continues that run from its step.
    """
    result = prune_and_export(model, data, target, options, out_dir, progress, should_cancel, onnx_spec=onnx_spec,
                              checkpoint=checkpoint, resume=resume)
    return write_report(result, Path(out_dir))


def write_report(result: Result, out_dir: Path) -> Result:
    """`result` with its report written to `out_dir`/report.json, once it is complete."""
    path = out_dir / "report.json"
    result.report.write(path)
    return dataclasses.replace(result, artifacts=result.artifacts | {"report.json": path})


def prune_and_export(
    model: nn.Module,
    data: Dataset,
    target: Target,
    options: CompressOptions | None = None,
    out_dir: Path | str = "idap-out",
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
    *,
    onnx_spec: OnnxSpec | None = None,
    checkpoint: CheckpointFn | None = None,
    resume: Checkpoint | None = None,
) -> Result:
    """`compress` up to report.json, which it leaves to the caller (see write_report): core.intake
    adds what it knows about the upload to the report first."""
    opts = options or CompressOptions()
    opts.validate()
    target.validate()
    started = time.monotonic()
    torch.manual_seed(opts.seed)
    reporter = Reporter(progress, should_cancel)
    timer = PhaseTimer(resolve_device(opts.device))
    with timer(Work.CALIBRATION):
        model, inputs, notes = _prepare(model, data, opts, reporter)
    if resume is not None and not resume.matches(inputs.options, target):
        notes.append("A checkpoint of another target or other options was not used; the run started over.")
        resume = None
    if resume is not None:
        started -= resume.elapsed  # the time budget counts the time spent before the checkpoint
    cache = RunCache()
    with timer(Work.SURGERY):
        original_size = cache.measure(model, inputs.example)
        reachable = _check_reachable(inputs, cache, original_size, target, model)
    run = start_run(model, inputs, cache, target, reporter, started, timer)
    spec, goals = run.spec, run.spec.goals
    original = copy.deepcopy(model)
    baseline = _baseline(run, original, onnx_spec)
    if resume is not None:
        model = _restore(run, resume)
        notes.append(f"Resumed from a checkpoint taken after step {resume.steps}.")
    saver = None if checkpoint is None else Saver(checkpoint, inputs.options, target, cache, started)

    model, state, reasons = _run_stages(run, model, saver, resume)
    verdict, state = _final_recovery(run, state, model, original)
    accuracy = verdict.accuracy
    size = run.measure(model)
    # a stage also reports target_reached when it stopped within tolerance just below the target
    reached = goals.reached(size) or (reasons[-1] == StopReason.TARGET_REACHED and goals.met(size))
    stop_reason = StopReason.TARGET_REACHED if reached else next(
        (r for r in reversed(reasons) if r != StopReason.TARGET_REACHED), StopReason.MAX_STEPS)

    reporter.emit("export", 0, 1, 0.93, "Exporting ONNX and .pt2")
    model = model.cpu().eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    onnx_path, pt2_path = out / "model.onnx", out / "model.pt2"
    example = spec.example.to("cpu")
    diff_after, latency_after = _onnx_metrics(timer, model, example, onnx_path, spec.evaluation.inputs[:64], opts,
                                              onnx_spec)
    with timer(Work.EXPORT):
        pt2_error = export_pt2(model, example, pt2_path, onnx_spec)
    artifacts = {"model.onnx": onnx_path} | ({} if pt2_error else {"model.pt2": pt2_path})

    reduction = goals.reductions(size)
    met = goals.met(size)
    report = Report(
        macs_before=original_size.macs, macs_after=size.macs,
        params_before=original_size.params, params_after=size.params,
        macs_reduction=round(reduction["macs"], 6), params_reduction=round(reduction["params"], 6),
        task=spec.task.task, accuracy_metric=goals.metric, budget=goals.metric.describe_budget(goals.target.budget),
        accuracy_before=round(goals.accuracy, 6), accuracy_after=round(accuracy, 6),
        eval_samples=len(spec.evaluation), budget_resolution=goals.resolution,
        soft_agreement_before=round(goals.soft_agreement, 6), soft_agreement_after=round(verdict.soft_agreement, 6),
        latency_ms_before=baseline.latency, latency_ms_after=latency_after,
        onnx_max_abs_diff=diff_after, onnx_max_abs_diff_before=baseline.onnx_max_abs_diff,
        onnx_bytes_before=baseline.onnx_bytes, onnx_bytes_after=onnx_path.stat().st_size,
        pt2_error=pt2_error,
        blocks=list(state.removed),
        layers=_layer_table(original, model, baseline.layer_divergence),
        attention_heads=_head_table(original, model),
        steps=list(state.steps),
        target=goals.target,
        target_met=met,
        reachable_reduction={k: round(v, 4) for k, v in reachable.items()},
        stop_reason=stop_reason,
        message=_explain(stop_reason, reasons, met, reduction, target),
        notes=notes + _uncut_notes(cache) + _recovery_notes(spec) + _undone_notes(state),
        device=str(spec.device),
        options=spec.options,
        seconds=round(time.monotonic() - started, 3),
        resumed_at_step=None if resume is None else resume.steps,
        phases=timer.costs(),
        peak_rss_mb=round(peak_rss_mb(), 1),
    )
    reporter.emit("done", 1, 1, 1.0, report.message, macs=size.macs, params=size.params, accuracy=accuracy)
    return Result(model=model, report=report, artifacts=artifacts)


def _prepare(model: nn.Module, data: Dataset, opts: CompressOptions,
             reporter: Reporter) -> tuple[nn.Module, RunInputs, list[str]]:
    """Copy the model to the device, check the data against it, split it, and set up the run's inputs."""
    device = resolve_device(opts.device)
    model = as_tensor_model(copy.deepcopy(model)).to(device).eval()
    notes = _drop_training_only_heads(model)
    data = data.bound(model)
    settled = settle_task(model, data, device, opts.task, opts.output, opts.detection_decoder)
    notes.append(settled.note)
    notes += convert_multihead_attention(model, data.inputs[:2].to(device)) + _attention_notes(model)
    large = is_large(sum(p.numel() for p in model.parameters()))
    if opts.lr is None:
        lr = TRANSFORMER_LR if holds_attention(model) else PRETRAINED_LR if large else DEFAULT_LR
        opts = dataclasses.replace(opts, lr=lr)
    # the precision recovery uses, as the report's options show it
    opts = dataclasses.replace(opts, precision=resolve_precision(opts.precision, device))
    unknown = [name for name in opts.ignored_layers if name not in dict(model.named_modules())]
    if unknown:
        raise OptionsError(f"Layers to leave alone not found in the model: {', '.join(unknown)}.",
                           hint="Use module names as printed by model.named_modules().")
    # the held-out split is at least one batch where the data allows, so accuracy is not a coin flip
    recovery, evaluation = split(data, opts.eval_fraction, opts.seed, min_eval=min(opts.batch_size, len(data) // 2))
    example = data.inputs[:2].to(device)
    inputs = RunInputs(
        options=opts, device=device, example=example,
        recovery=recovery, evaluation=evaluation, calib=recovery.inputs[: opts.calibration_samples],
        task=settled.handler,
        task_reason=settled.reason if settled.inferred else None,
        reference=collect(model, evaluation.inputs, device, settled.handler),
        feature_points=pick_feature_points(model, example),
        ignored=output_layers(model, example) + list(opts.ignored_layers),
        outputs=_output_names(model, example),
        augment=choose_augmenter(recovery, opts.augmentation) if settled.handler.may_augment(recovery.labeled)
        else None,
        frozen_norms=freezes_norms(recovery, opts.norm_statistics, large)
        and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()),
    )
    reporter.emit("baseline", 0, 1, 0.0, "Measuring the original model")
    return model, inputs, notes


def start_run(model: nn.Module, inputs: RunInputs, cache: RunCache, target: Target, reporter: Reporter,
              started: float, timer: PhaseTimer | None = None) -> Run:
    """The run of `model` (as _prepare returned it) towards `target`, once its accuracy is measured;
    `started` is when the time budget began; `timer` (a new one if None) takes the run's phases."""
    timer = timer or PhaseTimer(inputs.device)
    begin = time.monotonic()
    with timer(Work.EVALUATION):
        verdict = inputs.verdict(model)
    eval_s = time.monotonic() - begin
    target = target.with_budget(inputs.task.default_budget)
    metric = inputs.task.metric(inputs.evaluation.labeled)
    resolution = budget_resolution(target.budget, len(inputs.evaluation), inputs.options.eval_fraction, metric)
    goals = Goals(target, cache.measure(model, inputs.example), verdict.accuracy, verdict.soft_agreement, resolution,
                  metric)
    if resolution.warning:
        reporter.emit("baseline", 0, 1, None, "Warning: " + resolution.warning)
    run = Run(RunSpec.of(inputs, goals, started), cache, reporter, timer=timer)
    run.clock.eval_s = eval_s
    return run


def prepared_run(model: nn.Module, data: Dataset, target: Target, options: CompressOptions) -> tuple[nn.Module, Run]:
    """The model as compress holds it, and the run compress would start for it (without progress):
    for looking at one step's parts (tests, benchmarks/probe_samples.py) without running the stages."""
    model, inputs, _ = _prepare(model, data, options, Reporter(None, None))
    return model, start_run(model, inputs, RunCache(), target, Reporter(None, None), time.monotonic())


@dataclass(frozen=True)
class _OriginalNumbers:
    """What the report says about the original model beyond its size and accuracy."""

    layer_divergence: dict[str, float]
    onnx_max_abs_diff: float
    latency: Latency
    onnx_bytes: int


def _baseline(run: Run, original: nn.Module, onnx_spec: OnnxSpec | None) -> _OriginalNumbers:
    """Per-layer divergence and ONNX numbers of the original model, for the report."""
    spec, goals = run.spec, run.spec.goals
    names = {module: name for name, module in original.named_modules()}
    with run.timer(Work.SURGERY):
        graph = build_graph(original, spec.example)
    with run.timer(Work.SCORING):
        scores = filter_divergence(original, graph, spec.calib, spec.device, spec.options.batch_size)
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "original.onnx"
        begin = time.monotonic()
        diff, latency = _onnx_metrics(run.timer, original, spec.example, path, spec.evaluation.inputs[:64],
                                      spec.options, onnx_spec)
        run.clock.export_s = time.monotonic() - begin
        size = path.stat().st_size
    macs, params = goals.original
    run.reporter.emit("baseline", 1, 1, 0.05,
                      f"Original: {macs / 1e6:.2f} M MACs, {params / 1e6:.3f} M params, "
                      f"{goals.metric.label} {goals.metric.show(goals.accuracy)}",
                      macs=macs, params=params, accuracy=goals.accuracy)
    return _OriginalNumbers({names[m]: float(s.mean()) for m, s in scores.items()}, diff, latency, size)


def _restore(run: Run, resume: Checkpoint) -> nn.Module:
    """The checkpoint's model on the run's device, with the memos and the RNG as they were at its step."""
    run.cache.original_widths.update(resume.original_widths)
    run.cache.cuttable.update(resume.cuttable)
    torch.set_rng_state(resume.rng)
    return resume.model.to(run.spec.device)


def _run_stages(run: Run, model: nn.Module, saver: Saver | None = None,
                resume: Checkpoint | None = None) -> tuple[nn.Module, StageState, list[StopReason]]:
    """Stage 1 up to its share of the target, Stage 2, then Stage 1 again to close the gap; from
    the phase and state of `resume` when given (its model is `model`).

    A model with no removable block (a plain CNN without shortcuts) has no Stage 2: Stage 1 takes the
    whole target, and the run's stop reason is Stage 1's."""
    opts = run.spec.options
    state = resume.state if resume is not None else StageState()
    reasons = list(resume.reasons) if resume is not None else []
    first = resume.phase if resume is not None else Phase.FILTERS
    filters = Stage.FILTERS in opts.stages
    layers = Stage.LAYERS in opts.stages and (not filters or bool(find_blocks(model, run.spec.example)))
    for phase in Phase:
        if phase < first:
            continue
        step = run if saver is None else dataclasses.replace(run, on_accept=saver.at(phase, tuple(reasons)))
        if phase == Phase.FILTERS and filters:
            model, state, reason = prune_filters(step, model, state, share=opts.filter_share if layers else 1.0)
        elif phase == Phase.LAYERS and layers:
            essential = resume.essential if resume is not None and resume.phase == phase else frozenset()
            model, state, reason = remove_layers(step, model, state, essential)
        elif (phase == Phase.CLOSE_GAP and filters and layers and reasons[0] == StopReason.TARGET_REACHED
              and not run.spec.goals.reached(run.measure(model))):
            model, state, reason = prune_filters(step, model, state, share=1.0)
        else:
            continue
        reasons.append(reason)
    return model, state, reasons


def _final_recovery(run: Run, state: StageState, model: nn.Module,
                    original: nn.Module) -> tuple[Verdict, StageState]:
    """Distil from the original model; keep the weights from before if it did not help (by the measure
    that decides the budget)."""
    remaining = run.clock.remaining(0, run.spec.recovery_iterations(final=True))
    if remaining is not None:
        run.reporter.set_eta(remaining)
    run.reporter.emit("recovery", 0, 1, 0.85, "Final recovery (distillation from the original model)")
    state, verdict, _ = run.recovered(state, model, original, final=True)
    run.reporter.set_eta(run.clock.export_s)
    return verdict, state


def _explain(reason: StopReason, reasons: list[StopReason], met: bool, reduction: dict[str, float],
             target: Target) -> str:
    """The run's outcome in words; a missed target names why each stage stopped, the last stage's first
    (Stage 2 runs after Stage 1 hit the budget, and "no block can go" alone would hide that)."""
    got = f"MACs -{reduction['macs']:.1%}, params -{reduction['params']:.1%}"
    if met:
        return f"Target met: {got}."
    asked = ", ".join(
        f"{name} -{value:.0%}"
        for name, value in (("MACs", target.macs_reduction), ("params", target.params_reduction))
        if value is not None
    )
    earlier = [r for r in dict.fromkeys(reversed(reasons)) if r not in (reason, StopReason.TARGET_REACHED)]
    why = "".join(f"; before that, {r.explanation}" for r in earlier)
    return f"Target not met ({asked} asked, {got} reached): {reason.explanation}{why}."

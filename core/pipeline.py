"""`compress`: the one entry point the CLI and the worker call."""

from __future__ import annotations

import copy
import dataclasses
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.blocks import BlockCandidate, find_blocks, remove_block
from core.context import TARGET_TOLERANCE, RunContext
from core.data import Dataset, check_against_model, split
from core.divergence import filter_divergence
from core.errors import OptionsError, TargetUnreachableError
from core.export import export_onnx, export_pt2, verify_onnx
from core.metrics import ort_latency_ms, predict
from core.options import CompressOptions, Target
from core.progress import CancelFn, ProgressFn, Reporter
from core.recovery import pick_feature_points
from core.stages import _groups, prune_filters, remove_layers
from core.surgery import apply_plan, build_graph, make_plan


@dataclass
class Result:
    model: nn.Module
    report: dict[str, Any]
    artifacts: dict[str, Path]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise OptionsError("CUDA was requested but no CUDA device is available.", hint="Use --device cpu or auto.")
    return torch.device(name)


def _drop_training_only_heads(model: nn.Module) -> list[str]:
    """Auxiliary classifiers (GoogLeNet, Inception v3) run only in training mode; the dependency
    graph is traced in eval mode and cannot keep them consistent, and inference never uses them."""
    if not getattr(model, "aux_logits", False):
        return []
    model.aux_logits = False
    dropped = [name for name in ("aux1", "aux2", "AuxLogits") if getattr(model, name, None) is not None]
    for name in dropped:
        setattr(model, name, None)
    return [f"Removed training-only auxiliary head {name}." for name in dropped]


def _output_layers(model: nn.Module, example: torch.Tensor) -> list[str]:
    """The last Conv/Linear executed produces the logits; its outputs are the classes, never pruned."""
    executed: list[str] = []
    handles = [
        module.register_forward_hook(lambda _m, _i, _o, name=name: executed.append(name))
        for name, module in model.named_modules()
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear))
    ]
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return executed[-1:]


def _check_reachable(ctx: RunContext, model: nn.Module) -> dict[str, float]:
    """Largest reduction the minimum-width rules (and block removal) allow; refuse targets beyond it."""
    floor = copy.deepcopy(model)
    if "filters" in ctx.options.stages:
        graph = build_graph(floor, ctx.example)
        groups = _groups(ctx, floor, graph)
        scores = [torch.zeros(g.width) for g in groups]
        plan = make_plan(groups, scores, sum(g.capacity for g in groups), ctx.options.round_to)
        apply_plan(floor, ctx.example, plan)
    if "layers" in ctx.options.stages:
        for block in find_blocks(floor, ctx.example):
            remove_block(floor, block)
    reachable = ctx.reductions(*ctx.measure(floor))
    asked = {"macs": ctx.target.macs_reduction, "params": ctx.target.params_reduction}
    for key, goal in asked.items():
        if goal is not None and goal > reachable[key] + TARGET_TOLERANCE:
            raise TargetUnreachableError(
                f"A {goal:.0%} {key.upper() if key == 'macs' else key} reduction is out of reach: at most "
                f"{reachable[key]:.0%} can be removed with stages {','.join(ctx.options.stages)} and "
                f"min_width_fraction {ctx.options.min_width_fraction}.",
                hint=f"Ask for at most {reachable[key]:.2f}, or lower the minimum width.",
            )
    return reachable


def _layer_table(original: nn.Module, pruned: nn.Module, divergence: dict[str, float]) -> list[dict[str, Any]]:
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
        rows.append({"name": name, "channels_before": width, "channels_after": new_width,
                     "divergence": divergence.get(name)})
    return rows


def _onnx_metrics(model: nn.Module, example: torch.Tensor, path: Path, verify_on: torch.Tensor,
                  opts: CompressOptions) -> tuple[float, dict[str, float]]:
    export_onnx(model, example, path)
    diff = verify_onnx(model, path, verify_on)
    latency = ort_latency_ms(path, example.cpu().numpy(), (1, opts.latency_batch), opts.latency_runs)
    return diff, latency


def compress(
    model: nn.Module,
    data: Dataset,
    target: Target,
    options: CompressOptions | None = None,
    out_dir: Path | str = "idap-out",
    progress: ProgressFn | None = None,
    should_cancel: CancelFn | None = None,
) -> Result:
    """Prune `model` towards `target` and write model.onnx, model.pt2 and report.json to `out_dir`.

    The caller's model is not modified. Raises UserError subclasses for problems the
    caller can fix, and Cancelled when `should_cancel()` turns True.
    """
    opts = options or CompressOptions()
    opts.validate()
    target.validate()
    device = resolve_device(opts.device)
    reporter = Reporter(progress, should_cancel)
    started = time.monotonic()
    torch.manual_seed(opts.seed)
    out = Path(out_dir)

    model = copy.deepcopy(model).to(device).eval()
    notes = _drop_training_only_heads(model)
    check_against_model(model, data, device)
    recovery, evaluation = split(data, opts.eval_fraction, opts.seed)
    example = data.x[:2].to(device)
    names = dict(model.named_modules())
    unknown = [name for name in opts.ignored_layers if name not in names]
    if unknown:
        raise OptionsError(f"Layers to leave alone not found in the model: {', '.join(unknown)}.",
                           hint="Use module names as printed by model.named_modules().")
    reference = None if evaluation.labeled else predict(model, evaluation.x, device)
    ctx = RunContext(
        options=opts, target=target, device=device, reporter=reporter, example=example,
        recovery=recovery, evaluation=evaluation, calib=recovery.x[: opts.calibration_samples],
        reference=reference, feature_points=pick_feature_points(model, example),
        ignored=_output_layers(model, example) + list(opts.ignored_layers),
    )
    ctx.macs0, ctx.params0 = ctx.measure(model)
    reporter.emit("baseline", 0, 1, 0.0, "Measuring the original model")
    reachable = _check_reachable(ctx, model)
    ctx.acc0 = ctx.accuracy(model)
    module_names = {module: name for name, module in names.items()}
    layer_divergence = {
        module_names[module]: float(scores.mean())
        for module, scores in filter_divergence(model, build_graph(model, example), ctx.calib, device,
                                                opts.batch_size).items()
    }
    original = copy.deepcopy(model)
    verify_on = evaluation.x[:64]
    with tempfile.TemporaryDirectory() as scratch:
        diff_before, latency_before = _onnx_metrics(original, example, Path(scratch) / "original.onnx",
                                                    verify_on, opts)
        onnx_bytes_before = (Path(scratch) / "original.onnx").stat().st_size
    reporter.emit("baseline", 1, 1, 0.05, f"Original: {ctx.macs0 / 1e6:.2f} M MACs, {ctx.params0 / 1e6:.3f} M params, "
                  f"top-1 {ctx.acc0:.4f}", macs=ctx.macs0, params=ctx.params0, accuracy=ctx.acc0)

    removed_blocks: list[dict[str, Any]] = []

    def on_removed(block: BlockCandidate, divergence: float) -> None:
        removed_blocks.append({"name": block.name, "kind": block.kind, "divergence": round(divergence, 6)})

    reasons = []
    filters, layers = "filters" in opts.stages, "layers" in opts.stages
    if filters:
        model, reason = prune_filters(ctx, model, share=opts.filter_share if layers else 1.0)
        reasons.append(reason)
    if layers:
        model, reason = remove_layers(ctx, model, on_removed)
        reasons.append(reason)
    stage1_can_continue = reasons[0] in ("target_reached", "max_steps") if filters else False
    if filters and layers and stage1_can_continue and not ctx.reached(*ctx.measure(model)):
        model, reason = prune_filters(ctx, model, share=1.0)
        reasons.append(reason)

    reporter.emit("recovery", 0, 1, 0.85, "Final recovery (distillation from the original model)")
    before_final = copy.deepcopy(model.state_dict())
    accuracy_pre_final = ctx.accuracy(model)
    ctx.recover(model, original, final=True)
    accuracy = ctx.accuracy(model)
    if accuracy < accuracy_pre_final:
        model.load_state_dict(before_final)
        accuracy = accuracy_pre_final

    macs, params = ctx.measure(model)
    reached = ctx.reached(macs, params)
    stop_reason = "target_reached" if reached else next(
        (r for r in reversed(reasons) if r != "target_reached"), "max_steps")

    reporter.emit("export", 0, 1, 0.93, "Exporting ONNX and .pt2")
    model = model.cpu().eval()
    out.mkdir(parents=True, exist_ok=True)
    onnx_path = out / "model.onnx"
    example_cpu = example.cpu()
    diff_after, latency_after = _onnx_metrics(model, example_cpu, onnx_path, verify_on, opts)
    artifacts = {"model.onnx": onnx_path}
    pt2_path = out / "model.pt2"
    pt2_error = export_pt2(model, example_cpu, pt2_path)
    if pt2_error is None:
        artifacts["model.pt2"] = pt2_path

    reductions = ctx.reductions(macs, params)
    report: dict[str, Any] = {
        "macs_before": ctx.macs0, "macs_after": macs,
        "params_before": ctx.params0, "params_after": params,
        "macs_reduction": round(reductions["macs"], 6), "params_reduction": round(reductions["params"], 6),
        "accuracy_metric": "top1" if evaluation.labeled else "top1_agreement_with_original",
        "accuracy_before": round(ctx.acc0, 6), "accuracy_after": round(accuracy, 6),
        "eval_samples": len(evaluation),
        "latency_ms_before": latency_before, "latency_ms_after": latency_after,
        "onnx_max_abs_diff": diff_after, "onnx_max_abs_diff_before": diff_before,
        "onnx_bytes_before": onnx_bytes_before, "onnx_bytes_after": onnx_path.stat().st_size,
        "pt2_error": pt2_error,
        "removed_blocks": [b["name"] for b in removed_blocks], "blocks": removed_blocks,
        "layers": _layer_table(original, model, layer_divergence),
        "steps": ctx.steps,
        "target": dataclasses.asdict(target),
        "target_met": ctx.met(macs, params),
        "reachable_reduction": {k: round(v, 4) for k, v in reachable.items()},
        "stop_reason": stop_reason,
        "message": _explain(stop_reason, ctx.met(macs, params), reductions, target),
        "notes": notes,
        "device": str(device),
        "options": dataclasses.asdict(opts),
        "seconds": round(time.monotonic() - started, 3),
    }
    report_path = out / "report.json"
    report_path.write_text(json.dumps(report, indent=2, default=str))
    artifacts["report.json"] = report_path
    reporter.emit("done", 1, 1, 1.0, report["message"], macs=macs, params=params, accuracy=accuracy)
    return Result(model=model, report=report, artifacts=artifacts)


_REASONS = {
    "target_reached": "the size target was reached",
    "accuracy_budget": "the next step would have dropped accuracy past max_accuracy_drop (it was rolled back)",
    "max_steps": "Stage 1 used all its steps (raise max_steps or p0)",
    "nothing_left_to_prune": "every layer is at its minimum width (lower min_width_fraction)",
    "no_removable_blocks": "no further block can be removed within the budget",
    "max_removals": "Stage 2 removed max_removals blocks",
    "time_budget": "the time budget ran out",
}


def _explain(reason: str, met: bool, reductions: dict[str, float], target: Target) -> str:
    got = f"MACs -{reductions['macs']:.1%}, params -{reductions['params']:.1%}"
    if met:
        return f"Target met: {got}."
    asked = ", ".join(
        f"{name} -{value:.0%}"
        for name, value in (("MACs", target.macs_reduction), ("params", target.params_reduction))
        if value is not None
    )
    return f"Target not met ({asked} asked, {got} reached): {_REASONS.get(reason, reason)}."

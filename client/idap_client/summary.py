"""Text for the terminal: a job's progress line and the before/after table of its metrics."""

from __future__ import annotations

from idap_client.models import RELATIVE_METRICS, JobInfo, Metrics


def progress_line(job: JobInfo) -> str:
    progress = job.progress
    parts = [job.status]
    if job.status == "running" and job.attempts > 1:
        parts.append(f"attempt {job.attempts} of {job.max_attempts}")
    if progress.stage:
        parts.append(progress.stage)
    if progress.total_steps:
        parts.append(f"step {progress.step}/{progress.total_steps}")
    if job.status == "running":
        parts.append(f"{progress.fraction:.0%}")
    if progress.message:
        parts.append(progress.message)
    return "  ".join(parts)


def _count(value: float) -> str:
    for size, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:g}"


def _latency(values: dict[str, float], key: str) -> str:
    return f"{values[key]:.3f} ms" if key in values else "-"


def metric_value(metric: str, value: float) -> str:
    """A value of the task's metric: a percentage for fractions (top-1, mIoU, ...), a plain number for perplexity."""
    return f"{value:.3f}" if metric in RELATIVE_METRICS else f"{value:.2%}"


def metric_change(metric: str, before: float, after: float) -> str:
    """The change in the budget's units: points, or for perplexity percent of the original's."""
    if metric in RELATIVE_METRICS:
        return f"{(after - before) / max(abs(before), 1e-12):+.1%}"
    return f"{(after - before) * 100:+.2f} pt"


def metrics_table(metrics: Metrics) -> str:
    """The before/after table `idap prune` prints, from a job's metrics."""
    metric = metrics.accuracy_metric
    rows = [
        ("MACs", _count(metrics.macs_before), _count(metrics.macs_after), f"-{metrics.macs_reduction:.1%}"),
        ("params", _count(metrics.params_before), _count(metrics.params_after), f"-{metrics.params_reduction:.1%}"),
        (metric, metric_value(metric, metrics.accuracy_before), metric_value(metric, metrics.accuracy_after),
         metric_change(metric, metrics.accuracy_before, metrics.accuracy_after)),
    ]
    for key in sorted(set(metrics.latency_ms_before) | set(metrics.latency_ms_after)):
        before, after = metrics.latency_ms_before.get(key), metrics.latency_ms_after.get(key)
        change = f"{after / before - 1:+.1%}" if before and after is not None else ""
        rows.append((f"ORT latency {key.replace('_', ' ')}", _latency(metrics.latency_ms_before, key),
                     _latency(metrics.latency_ms_after, key), change))
    widths = [max(len(row[column]) for row in [("", "before", "after", "change"), *rows]) for column in range(4)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()
             for row in [("", "before", "after", "change"), *rows]]
    removed = ", ".join(metrics.removed_blocks) or "none"
    lines += [
        f"ONNX max abs diff  {metrics.onnx_max_abs_diff:.2e}",
        f"removed blocks     {removed}",
        f"target met         {'yes' if metrics.target_met else 'no'} ({metrics.stop_reason})",
        f"task               {metrics.task}" + (f"; {metrics.budget}" if metrics.budget else ""),
        f"device, time       {metrics.device}, {metrics.seconds:.1f} s",
        metrics.message,
    ]
    if metrics.pt2_error:
        lines.append(f"model.pt2 missing: {metrics.pt2_error}")
    return "\n".join(lines)

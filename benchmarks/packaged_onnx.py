"""What the benchmarks of real ONNX models shipped inside PyPI wheels share: finding the model file in an
installed wheel, the row a `compress_files` report gives, and the results file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import torch

from benchmarks.fashion_mnist import environment
from core.report import Report


def packaged_file(package: str, relative: str) -> Path:
    """A file inside an installed package, found without importing it (the detectors' packages need
    OpenCV, which the benchmarks do not)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(name=package)
    return Path(next(iter(spec.submodule_search_locations))) / relative


def report_row(report: Report) -> dict[str, Any]:
    """The report's numbers that a benchmark row keeps: size, the budget's measure, steps, latency."""
    return {
        "task": report.task, "metric": report.accuracy_metric, "budget": report.budget,
        "eval_samples": report.eval_samples, "macs_before": report.macs_before, "macs_after": report.macs_after,
        "macs_reduction": report.macs_reduction, "params_reduction": report.params_reduction,
        "target_met": report.target_met, "stop_reason": report.stop_reason,
        "held_out_before": report.accuracy_before, "held_out_after": report.accuracy_after,
        "steps_accepted": sum(s.accepted for s in report.steps),
        "steps_rolled_back": sum(not s.accepted for s in report.steps),
        "latency_ms_before": report.latency_ms_before, "latency_ms_after": report.latency_ms_after,
        "onnx_max_abs_diff": report.onnx_max_abs_diff,
    }


def write_results(work: Path, settings: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    results = {"settings": settings, "environment": environment(torch.get_num_threads()), "rows": rows}
    (work / "results.json").write_text(json.dumps(results, indent=2))

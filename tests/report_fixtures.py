"""A complete `Report` with made-up numbers, for tests of what reads or writes reports."""

from __future__ import annotations

from typing import Any

from core.options import CompressOptions, Stage, Target
from core.report import HeadRow, LayerRow, RemovedBlock, Report, StepRecord, StopReason, WidthComparison

LATENCY = {"batch_1": 1.0, "batch_32": 4.0}


def sample_steps() -> list[StepRecord]:
    """A Stage 1 step, a Stage 2 removal (its recovery undone), and a Stage 2 removal declined because width
    did better (no recovery)."""
    comparison = WidthComparison(drift=0.02, width_drift=0.01, width_accuracy=0.97, width_units_removed=16,
                                 declined="pruning width to the same size did better")
    return [
        StepRecord(stage=Stage.FILTERS, step=1, macs=3_000_000, params=80_000, accuracy=0.985, seconds=1.5,
                   accepted=True, recovery_kept=True, units_removed=24),
        StepRecord(stage=Stage.LAYERS, step=2, macs=2_000_000, params=50_000, accuracy=0.98, seconds=2.0,
                   accepted=True, recovery_kept=False, block="blocks.1", divergence=0.125),
        StepRecord(stage=Stage.LAYERS, step=3, macs=1_500_000, params=40_000, accuracy=0.95, seconds=2.5,
                   accepted=False, block="blocks.2", divergence=0.25, **comparison.model_dump()),
    ]


def sample_report(**changes: Any) -> Report:
    report = Report(
        macs_before=4_000_000, macs_after=2_000_000, params_before=100_000, params_after=50_000,
        macs_reduction=0.5, params_reduction=0.5, accuracy_metric="top1", accuracy_before=0.99, accuracy_after=0.98,
        eval_samples=360, latency_ms_before=LATENCY, latency_ms_after=LATENCY, onnx_max_abs_diff=1e-6,
        onnx_max_abs_diff_before=2e-6, onnx_bytes_before=400_000, onnx_bytes_after=200_000, pt2_error=None,
        blocks=[RemovedBlock(name="blocks.1", kind="residual", divergence=0.125)],
        layers=[LayerRow(name="stem", channels_before=32, channels_after=16, divergence=0.5),
                LayerRow(name="head", channels_before=10, channels_after=10, divergence=None)],
        attention_heads=[HeadRow(name="encoder.0.attention", heads_before=4, heads_after=2)],
        steps=sample_steps(), target=Target(macs_reduction=0.5, max_accuracy_drop=0.01), target_met=True,
        reachable_reduction={"macs": 0.9, "params": 0.9}, stop_reason=StopReason.TARGET_REACHED,
        message="Target met: MACs -50.0%, params -50.0%.", notes=[], device="cpu",
        options=CompressOptions(lr=1e-3), seconds=12.5,
    )
    return report.model_copy(update=changes)

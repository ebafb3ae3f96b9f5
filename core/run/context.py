"""State shared by the stages of one compression run: data, baseline numbers, measurements."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.data import Dataset
from core.measure.accuracy import drift, top1
from core.measure.size import count_macs_params
from core.options import CompressOptions, Target
from core.progress import Reporter
from core.recovery.distill import iterations_for, recover
from core.surgery.units import Means, UnitKey

# The result may miss the size target by this much and still count as met (issue #2).
TARGET_TOLERANCE = 0.03


@dataclass
class RunContext:
    options: CompressOptions
    target: Target
    device: torch.device
    reporter: Reporter
    example: torch.Tensor  # two samples on `device`, for tracing and MACs
    recovery: Dataset
    evaluation: Dataset
    calib: torch.Tensor
    reference: torch.Tensor | None  # original predictions on the evaluation split
    reference_logits: torch.Tensor  # original logits on the evaluation split
    feature_points: list[str]
    ignored: list[str]
    macs0: int = 0
    params0: int = 0
    acc0: float = 0.0
    started: float = field(default_factory=time.monotonic)
    original_widths: dict[UnitKey, int] = field(default_factory=dict)
    # group key -> whether its group survives a one-channel cut (see surgery.survives_channel_cut)
    cuttable: dict[UnitKey, bool] = field(default_factory=dict)
    steps: list[dict[str, Any]] = field(default_factory=list)
    filter_steps: int = 0
    # consumers' and readers' input statistics from the last scoring (CompressOptions.mean_compensation)
    unit_means: Means = field(default_factory=dict)
    recoveries: int = 0
    _sizes: dict[tuple, tuple[int, int]] = field(default_factory=dict)

    def measure(self, model: nn.Module) -> tuple[int, int]:
        """MACs and params, memoised on the architecture: they do not depend on weight values,
        and the stages ask about the same model many times."""
        signature = tuple((name, tuple(p.shape)) for name, p in model.named_parameters()) + tuple(
            (name, type(m).__name__) for name, m in model.named_modules()
        )
        if signature not in self._sizes:
            self._sizes[signature] = count_macs_params(model, self.example)
        return self._sizes[signature]

    def accuracy(self, model: nn.Module) -> float:
        return top1(model, self.evaluation, self.device, self.reference)

    def drift(self, model: nn.Module) -> float:
        return drift(model, self.evaluation.x, self.device, self.reference_logits)

    def no_larger(self, macs: int, params: int, than: tuple[int, int]) -> bool:
        """Whether a model is at most as large as `than` in every measure the target names."""
        got, bound = self.reductions(macs, params), self.reductions(*than)
        return all(got[key] >= bound[key] - 1e-9 for key in self._goals())

    def reductions(self, macs: int, params: int) -> dict[str, float]:
        return {"macs": 1.0 - macs / self.macs0, "params": 1.0 - params / self.params0}

    def share_of_target(self, before: tuple[int, int], after: tuple[int, int]) -> float:
        """How much of the size target going from `before` to `after` (MACs, params) achieves (1.0 = all)."""
        start, end = self.reductions(*before), self.reductions(*after)
        return sum((end[key] - start[key]) / goal for key, goal in self._goals().items())

    def _goals(self) -> dict[str, float]:
        goals = {"macs": self.target.macs_reduction, "params": self.target.params_reduction}
        return {key: value for key, value in goals.items() if value is not None}

    def reached(self, macs: int, params: int, share: float = 1.0) -> bool:
        got = self.reductions(macs, params)
        return all(got[key] >= share * goal - 1e-9 for key, goal in self._goals().items())

    def overshoots(self, macs: int, params: int) -> bool:
        got = self.reductions(macs, params)
        return any(got[key] > goal + TARGET_TOLERANCE for key, goal in self._goals().items())

    def met(self, macs: int, params: int) -> bool:
        got = self.reductions(macs, params)
        return all(got[key] >= goal - TARGET_TOLERANCE for key, goal in self._goals().items())

    def progress(self, macs: int, params: int) -> float:
        got = self.reductions(macs, params)
        goals = self._goals()
        return min(min(got[key] / goal, 1.0) for key, goal in goals.items())

    def within_budget(self, accuracy: float) -> bool:
        return self.acc0 - accuracy <= self.target.max_accuracy_drop + 1e-9

    def out_of_time(self) -> bool:
        budget = self.options.time_budget_s
        return budget is not None and time.monotonic() - self.started > budget

    def recover(self, student: nn.Module, teacher: nn.Module, *, final: bool = False) -> None:
        opts = self.options
        epochs = opts.final_recovery_epochs if final else opts.recovery_epochs
        iterations = opts.final_recovery_iterations if final else opts.recovery_iterations
        self.recoveries += 1
        recover(
            student, teacher, self.recovery, self.feature_points,
            iterations_for(len(self.recovery), opts.batch_size, epochs, iterations),
            device=self.device, batch_size=opts.batch_size, lr=opts.lr, weight_decay=opts.weight_decay,
            temperature=opts.kd_temperature, kd_weight=opts.kd_weight, feature_weight=opts.feature_weight,
            seed=opts.seed + self.recoveries, reporter=self.reporter,
        )

    def record(self, stage: str, model_macs: int, model_params: int, accuracy: float, seconds: float,
               accepted: bool, **extra: Any) -> None:
        self.steps.append({
            "stage": stage, "step": len(self.steps) + 1, "macs": model_macs, "params": model_params,
            "accuracy": round(accuracy, 6), "seconds": round(seconds, 3), "accepted": accepted, **extra,
        })
        reduction = self.reductions(model_macs, model_params)
        self.reporter.emit(
            stage, len(self.steps), self.options.max_steps + self.options.max_removals,
            0.05 + 0.8 * self.progress(model_macs, model_params) if accepted else None,
            f"{stage} step {len(self.steps)}: MACs -{reduction['macs']:.1%}, params -{reduction['params']:.1%}, "
            f"top-1 {accuracy:.4f}{_outcome(accepted, extra)}",
            macs=model_macs, params=model_params, accuracy=accuracy, accepted=accepted,
        )


def _outcome(accepted: bool, extra: dict[str, Any]) -> str:
    if accepted:
        return ""
    return f" (declined: {extra['declined']})" if "declined" in extra else " (rolled back)"

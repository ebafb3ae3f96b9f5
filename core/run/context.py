"""One compression run: what it is given (`RunInputs`, `RunSpec`), what it memoises (`RunCache`),
and what its stages carry from step to step (`StageState`)."""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from core.data import Dataset
from core.inputs import Inputs
from core.measure.size import count_macs_params
from core.options import CompressOptions, Stage
from core.progress import Reporter
from core.recovery.augment import Augmenter
from core.recovery.distill import iterations_for, recover
from core.report import RemovedBlock, StepRecord, WidthComparison, Work
from core.run.eta import Clock, schedule_steps
from core.run.goals import Goals, Size, Verdict
from core.run.phases import PhaseTimer
from core.surgery.units import UnitKey
from core.tasks.base import Records, TaskHandler, collect


@dataclass(frozen=True)
class RunInputs:
    """The options and the data as a run uses them, prepared from the model (core.pipeline._prepare):
    all a preflight needs."""

    options: CompressOptions
    device: torch.device
    example: Inputs  # two samples on `device`, for tracing and MACs
    recovery: Dataset
    evaluation: Dataset
    calib: Inputs
    task: TaskHandler
    task_reason: str | None  # why auto chose the task (None: the caller chose it)
    reference: Records  # what the task records of the original's outputs on the evaluation split
    feature_points: list[str]
    ignored: list[str]
    outputs: tuple[str, ...]  # the model's outputs by name (core.graph.outputs), every one kept as it is
    augment: Augmenter | None  # what recovery augments its batches with (core.recovery.augment)
    frozen_norms: bool  # whether recovery keeps BatchNorm statistics as they are (core.recovery.distill.freezes_norms)

    @property
    def lr(self) -> float:
        """The recovery learning rate: options.lr, which _prepare sets for the model when the caller left it None."""
        if self.options.lr is None:
            raise ValueError("RunInputs.options.lr is set by core.pipeline._prepare.")
        return self.options.lr

    def verdict(self, model: nn.Module) -> Verdict:
        """The task's metric (against the labels, else the original's outputs) and its smooth agreement with
        the original, from one pass over the evaluation split."""
        records = collect(model, self.evaluation.inputs, self.device, self.task)
        return Verdict(self.task.quality(records, self.reference, self.evaluation.y),
                       self.task.agreement(records, self.reference))

    def recovery_iterations(self, final: bool = False) -> int:
        """Optimizer iterations of one step's recovery, or of the final one (with the floors)."""
        opts = self.options
        if final:
            return iterations_for(len(self.recovery), opts.batch_size, opts.final_recovery_epochs,
                                  opts.final_recovery_iterations, opts.min_final_recovery_iterations)
        return iterations_for(len(self.recovery), opts.batch_size, opts.recovery_epochs, opts.recovery_iterations,
                              opts.min_recovery_iterations)

    def drift(self, model: nn.Module) -> float:
        """How far `model`'s outputs on the evaluation split drift from the original's (the task's drift)."""
        return self.task.drift(collect(model, self.evaluation.inputs, self.device, self.task), self.reference)


@dataclass(frozen=True)
class RunSpec(RunInputs):
    """A compression run's description: its inputs, and the goals measured against the original model."""

    goals: Goals
    deadline: float | None  # time.monotonic() past which the stages stop (CompressOptions.time_budget_s)

    @classmethod
    def of(cls, inputs: RunInputs, goals: Goals, started: float) -> RunSpec:
        budget = inputs.options.time_budget_s
        return cls(**vars(inputs), goals=goals, deadline=None if budget is None else started + budget)

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline


@dataclass
class RunCache:
    """Memos owned by one run, so that its stages do not recompute what cannot change; none of
    them changes a result.

    `sizes`: MACs and params by architecture signature (they do not depend on weight values).
    `cuttable`: per group key, whether the group survives a one-channel cut (see
    surgery.trial.survives_channel_cut), which only depends on the architecture around it.
    `original_widths`: per group, its width when first seen, which is on the original model.
    """

    sizes: dict[tuple, Size] = field(default_factory=dict)
    cuttable: dict[UnitKey, bool] = field(default_factory=dict)
    original_widths: dict[UnitKey, int] = field(default_factory=dict)

    def measure(self, model: nn.Module, example: Inputs) -> Size:
        """MACs and params of `model` on `example`."""
        signature = tuple((name, tuple(p.shape)) for name, p in model.named_parameters()) + tuple(
            (name, type(m).__name__) for name, m in model.named_modules()
        )
        if signature not in self.sizes:
            self.sizes[signature] = Size(*count_macs_params(model, example))
        return self.sizes[signature]


@dataclass(frozen=True)
class StageState:
    """What the stages carry from one step to the next: each stage takes it and returns the new one."""

    steps: tuple[StepRecord, ...] = ()
    # Stage 1's schedule position, so that a later Stage 1 call continues the schedule
    filter_steps: int = 0
    # recoveries so far; each recovery is seeded with options.seed + its number
    recoveries: int = 0
    # Stage 1's step size relative to its schedule, halved by each back-off after a rejected step and
    # doubled again (up to 1) after GROW_AFTER steps in a row accepted at their first try
    step_scale: float = 1.0
    # Stage 1 steps accepted at their first try since the last back-off or growth
    clean_steps: int = 0
    removed: tuple[RemovedBlock, ...] = ()


# Called with the model of each accepted step, the state that records it, and (Stage 2) the blocks
# found not removable so far: where a checkpoint is taken (core.run.checkpoint).
AcceptFn = Callable[[nn.Module, StageState, frozenset[str]], None]


@dataclass(frozen=True)
class Run:
    """What every stage of a run works with: its description, its memos and its progress reporter."""

    spec: RunSpec
    cache: RunCache
    reporter: Reporter
    clock: Clock = field(default_factory=Clock)
    on_accept: AcceptFn | None = None
    timer: PhaseTimer = field(default_factory=PhaseTimer)

    def accepted(self, model: nn.Module, state: StageState, essential: frozenset[str] = frozenset()) -> None:
        """`model` was accepted as the step `state` ends with."""
        if self.on_accept is not None:
            self.on_accept(model, state, essential)

    def measure(self, model: nn.Module) -> Size:
        with self.timer(Work.SURGERY):
            return self.cache.measure(model, self.spec.example)

    def verdict(self, model: nn.Module) -> Verdict:
        with self.timer(Work.EVALUATION):
            return self.spec.verdict(model)

    def drift(self, model: nn.Module) -> float:
        with self.timer(Work.EVALUATION):
            return self.spec.drift(model)

    def recovered(self, state: StageState, student: nn.Module, teacher: nn.Module, *,
                  final: bool = False) -> tuple[StageState, Verdict, bool | None]:
        """Distil `teacher` into `student` in place and judge it on the held-out split.

        A recovery that leaves `student` worse than it was before by the measure that decides the budget
        (Goals.better) is undone: the step is then judged as its surgery and compensation left it. Returns
        the state, the verdict, and whether the recovery was kept (None when there was none).
        """
        if self.spec.recovery_iterations(final) == 0:
            return state, self.verdict(student), None
        before = copy.deepcopy(student.state_dict())
        verdict_before = self.verdict(student)
        state = self.recover(state, student, teacher, final=final)
        verdict = self.verdict(student)
        if self.spec.goals.better(verdict, verdict_before):
            return state, verdict, True
        student.load_state_dict(before)
        return state, verdict_before, False

    def recover(self, state: StageState, student: nn.Module, teacher: nn.Module, *,
                final: bool = False) -> StageState:
        """Distil `teacher` into `student` in place (one step's budget, or the final recovery's)."""
        opts = self.spec.options
        state = dataclasses.replace(state, recoveries=state.recoveries + 1)
        iterations = self.spec.recovery_iterations(final)
        started = time.monotonic()
        with self.timer(Work.RECOVERY):
            recover(
                student, teacher, self.spec.recovery, self.spec.feature_points, iterations,
                device=self.spec.device, batch_size=opts.batch_size, lr=self.spec.lr, weight_decay=opts.weight_decay,
                temperature=opts.kd_temperature, kd_weight=opts.kd_weight, feature_weight=opts.feature_weight,
                seed=opts.seed + state.recoveries, reporter=self.reporter, task=self.spec.task,
                augment=self.spec.augment, precision=opts.precision, frozen_norms=self.spec.frozen_norms,
            )
        if iterations:
            self.clock.iteration_s.append((time.monotonic() - started) / iterations)
        return state

    def record(self, state: StageState, stage: Stage, size: Size, verdict: Verdict, seconds: float,
               accepted: bool, *, recovery_kept: bool | None = None, units_removed: int | None = None,
               step_scale: float | None = None,
               block: str | None = None, divergence: float | None = None,
               comparison: WidthComparison | None = None) -> StageState:
        """The state with this step's record added; the step is reported as progress."""
        accuracy = verdict.accuracy
        step = StepRecord(
            stage=stage, step=len(state.steps) + 1, macs=size.macs, params=size.params,
            accuracy=round(accuracy, 6), soft_agreement=round(verdict.soft_agreement, 6), seconds=round(seconds, 3),
            accepted=accepted, recovery_kept=recovery_kept, units_removed=units_removed, step_scale=step_scale,
            block=block, divergence=divergence, **(comparison.model_dump() if comparison is not None else {}),
        )
        self.clock.step_s.append(seconds)
        state = dataclasses.replace(state, steps=(*state.steps, step))
        self._update_eta(state, stage, accepted)
        opts, goals = self.spec.options, self.spec.goals
        reduction = goals.reductions(size)
        self.reporter.emit(
            stage.value, step.step, opts.max_steps + opts.max_removals,
            0.05 + 0.8 * goals.progress(size) if accepted else None,
            f"{stage} step {step.step}: MACs -{reduction['macs']:.1%}, params -{reduction['params']:.1%}, "
            f"{goals.metric.label} {goals.metric.show(accuracy)}{_outcome(step)}",
            macs=size.macs, params=size.params, accuracy=accuracy, accepted=accepted,
        )
        return state

    def _update_eta(self, state: StageState, stage: Stage, accepted: bool) -> None:
        """Time to go after a recorded step: the schedule's steps from the model kept so far (a rejected
        Stage 1 step is retried at half its size), then the final recovery and the export."""
        goals = self.spec.goals
        kept = next((Size(s.macs, s.params) for s in reversed(state.steps) if s.accepted), goals.original)
        goal = max(goals.fractions.values())
        retry = stage == Stage.FILTERS and not accepted
        steps = retry + schedule_steps(
            self.spec.options, goal, reached=goals.progress(kept) * goal,
            t0=state.filter_steps + (stage == Stage.FILTERS and accepted),
            scale=state.step_scale / 2 if retry else state.step_scale)
        remaining = self.clock.remaining(steps, self.spec.recovery_iterations(final=True))
        if remaining is not None:
            self.reporter.set_eta(remaining)


def _outcome(step: StepRecord) -> str:
    if step.accepted:
        return ""
    return f" (declined: {step.declined})" if step.declined is not None else " (rolled back)"

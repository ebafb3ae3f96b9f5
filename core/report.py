"""What a run reports: report.json (`Report`), the preflight (`PreflightReport`) and their parts.

The JSON shapes are what stored jobs and the UI read: keys and value shapes are those of the
dicts these models replaced, and keys that only some runs have are left out of the JSON when a
run does not set them.
"""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, computed_field, model_serializer

from core.options import CompressOptions, Stage, Target
from core.tasks.kinds import Metric, Task

# ONNX Runtime latency by batch size ("batch_1", "batch_32"), in milliseconds.
Latency = dict[str, float]


class StopReason(StrEnum):
    """Why a stage, and so the run, stopped."""

    TARGET_REACHED = "target_reached"
    ACCURACY_BUDGET = "accuracy_budget"
    MAX_STEPS = "max_steps"
    NOTHING_LEFT_TO_PRUNE = "nothing_left_to_prune"
    NO_REMOVABLE_BLOCKS = "no_removable_blocks"
    MAX_REMOVALS = "max_removals"
    WIDTH_BEATS_LAYERS = "width_beats_layers"
    TIME_BUDGET = "time_budget"

    @property
    def explanation(self) -> str:
        """The reason in words, for the message of a run that missed its target."""
        return _EXPLANATIONS[self]


_EXPLANATIONS = {
    StopReason.TARGET_REACHED: "the size target was reached",
    StopReason.ACCURACY_BUDGET:
        "the next step dropped accuracy past max_accuracy_drop even at the smallest step size, after halving "
        "it (each try was rolled back; lower min_step_fraction, raise max_accuracy_drop or bring more data)",
    StopReason.MAX_STEPS: "Stage 1 used all its steps (raise max_steps or p0)",
    StopReason.NOTHING_LEFT_TO_PRUNE: "every layer is at its minimum width (lower min_width_fraction)",
    StopReason.NO_REMOVABLE_BLOCKS: "no further block can be removed within the budget",
    StopReason.MAX_REMOVALS: "Stage 2 removed max_removals blocks",
    StopReason.WIDTH_BEATS_LAYERS: "removing the next block did worse than pruning width to the same size",
    StopReason.TIME_BUDGET: "the time budget ran out",
}


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class Work(StrEnum):
    """The kinds of work a run is made of."""

    CALIBRATION = "calibration"  # checking and splitting the data, the original's reference outputs
    SCORING = "scoring"  # calibration passes: divergence and compensation statistics, block scores
    PROBES = "probes"  # drift allocation's probes (core.run.allocation)
    SURGERY = "surgery"  # dependency graphs, group checks, plans applied, sizes measured
    RECOVERY = "recovery"
    EVALUATION = "evaluation"  # the held-out split, after each step
    EXPORT = "export"  # ONNX (and its check against PyTorch) and .pt2
    LATENCY = "latency"  # ONNX Runtime timings


class PhaseCost(_Frozen):
    """One kind of work's share of a run (core.run.phases): its own time (work nested in it counts
    where it is nested, not twice) and the most accelerator memory allocated while it ran."""

    work: Work
    seconds: float
    peak_gpu_mb: float | None = None  # None on the CPU


class BudgetResolution(_Frozen):
    """How finely the held-out split measures the budget (core.run.goals.budget_resolution); only a top-1
    budget can be finer than the split: the other metrics are resolved and `top1_tolerance` is the budget."""

    eval_samples: int  # held-out samples that decide the budget
    sample_worth: float  # what one of them is worth in top-1 (1 / eval_samples)
    resolved: bool  # whether the budget is worth at least RESOLVING_SAMPLES samples
    top1_tolerance: float  # the top-1 drop a step may cost: the budget, or RESOLVING_SAMPLES samples' worth
    decided_by: Metric | Literal["top1_and_soft_agreement"]
    warning: str | None = None  # for a budget the split cannot resolve: what it means and what to do


class StepRecord(_Frozen):
    """One pruning step, accepted or rolled back, with the model's size and accuracy after it."""

    stage: Stage  # Stage 1 (filters) prunes width, Stage 2 (layers) removes blocks
    step: int
    macs: int
    params: int
    accuracy: float
    seconds: float
    accepted: bool
    soft_agreement: float | None = None  # the mean probability of the original's class (core.run.goals.Verdict)
    # whether the step's recovery was kept: one that left the held-out measure worse is undone (Run.recovered)
    recovery_kept: bool | None = None
    # Stage 1: units removed, and the step's size relative to the schedule's (halved by each back-off)
    units_removed: int | None = None
    step_scale: float | None = None
    # Stage 2: the block tried, and its comparison with pruning width to the same size
    block: str | None = None
    divergence: float | None = None
    drift: float | None = None
    width_drift: float | None = None
    width_accuracy: float | None = None
    width_units_removed: int | None = None
    declined: str | None = None

    # No return annotation: pydantic would document the annotated type (a bare object) in OpenAPI
    # instead of the model's fields.
    @model_serializer(mode="wrap")
    def _without_other_stages_fields(self, handler: SerializerFunctionWrapHandler):
        # no field a step has is ever None, so None means the step does not have it
        return {key: value for key, value in handler(self).items() if value is not None}


class WidthComparison(_Frozen):
    """A Stage 2 removal against one Stage 1 step to the same size (CompressOptions.layers_must_beat_width):
    both candidates' drift from the original and the width candidate's accuracy and units removed."""

    drift: float
    width_drift: float
    width_accuracy: float
    width_units_removed: int
    declined: str | None = None  # why the removal was declined, when the width candidate did better


class LayerRow(_Frozen):
    """A Conv/Linear layer of the original model: its output width before and after (0 when its
    block was removed), and its divergence on the original model (None when it was not scored)."""

    name: str
    channels_before: int
    channels_after: int
    divergence: float | None


class HeadRow(_Frozen):
    """A recognised attention module's heads before and after (0 when its layer was removed)."""

    name: str
    heads_before: int
    heads_after: int


class RemovedBlock(_Frozen):
    """A block Stage 2 removed, and its divergence when it was chosen."""

    name: str
    kind: str
    divergence: float


class _BeforeAndAfter(_Frozen):
    """The model's size and quality before and after: the first keys of a report and of its headline.
    `accuracy_*` hold the task's metric (`accuracy_metric`), whatever the task."""

    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    macs_reduction: float
    params_reduction: float
    accuracy_metric: Metric
    accuracy_before: float
    accuracy_after: float
    # reports written before tasks existed were all classification
    task: Task = Task.CLASSIFICATION
    budget: str | None = None  # the budget in words (Metric.describe_budget)


class ReportHeadline(_BeforeAndAfter):
    """The numbers a job keeps next to its status, from its report."""

    latency_ms_before: Latency
    latency_ms_after: Latency
    onnx_max_abs_diff: float
    target_met: bool
    stop_reason: StopReason
    message: str
    removed_blocks: list[str]  # names, as in report.json
    device: str
    seconds: float
    pt2_error: str | None


_UPLOAD_KEYS = ("input_format", "hf_pretrained", "hf_pretrained_error")


class _FromUpload(_Frozen):
    """A report that core.intake completes for uploaded files: its keys about the upload
    (input_format, and hf_pretrained* for Hugging Face uploads) are in the JSON only when set,
    as for a model handed to compress directly they never were."""

    @model_serializer(mode="wrap")  # no return annotation, as in StepRecord: OpenAPI documents the fields
    def _without_unset_upload_keys(self, handler: SerializerFunctionWrapHandler):
        return {key: value for key, value in handler(self).items()
                if key not in _UPLOAD_KEYS or key in self.model_fields_set}


class Report(_FromUpload, _BeforeAndAfter):
    """report.json: the model before and after, every step, and why the run stopped."""

    eval_samples: int
    latency_ms_before: Latency
    latency_ms_after: Latency
    onnx_max_abs_diff: float
    onnx_max_abs_diff_before: float
    onnx_bytes_before: int
    onnx_bytes_after: int
    pt2_error: str | None
    blocks: list[RemovedBlock]
    layers: list[LayerRow]
    attention_heads: list[HeadRow]
    steps: list[StepRecord]
    target: Target
    target_met: bool
    reachable_reduction: dict[str, float]
    stop_reason: StopReason
    message: str
    notes: list[str]
    device: str
    options: CompressOptions
    seconds: float
    # the run resumed from a checkpoint taken after this many steps (a service's worker died mid-run)
    resumed_at_step: int | None = None
    input_format: str | None = None
    # reports written before issue #17 lack these three
    budget_resolution: BudgetResolution | None = None
    soft_agreement_before: float | None = None
    soft_agreement_after: float | None = None
    # the model back in Hugging Face format: its file name, or why it could not be written
    hf_pretrained: str | None = None
    hf_pretrained_error: str | None = None
    # where the run's time went (core.run.phases); reports written before issue #20 lack these
    phases: list[PhaseCost] = []
    peak_rss_mb: float | None = None

    @computed_field  # type: ignore[prop-decorator]
    @property
    def removed_blocks(self) -> list[str]:
        """The names in `blocks`; a key of its own in report.json (after the others), which readers use."""
        return [block.name for block in self.blocks]

    def headline(self) -> ReportHeadline:
        return ReportHeadline(**{name: getattr(self, name) for name in ReportHeadline.model_fields})

    def write(self, path: Path) -> None:
        path.write_text(to_json(self))


class GroupRow(_Frozen):
    """A prunable channel or head group: its width and the width it may not go below."""

    name: str
    width: int
    min_width: int


class NotPrunableRow(_Frozen):
    """A layer with weights whose output width stays as it is, and why."""

    name: str
    type: str
    reason: str


class OutputRow(_Frozen):
    """One of the model's outputs (flattened: see core.graph.outputs.named_outputs) and its per-sample shape."""

    name: str
    shape: list[int]


class BlockRow(_Frozen):
    name: str
    kind: str


class Estimate(_Frozen):
    """A job's time in seconds, from one Stage 1 step of the real schedule measured on `measured_on`
    (core.run.preflight): `cpu` and `gpu` the expected time (one of them measured, the other scaled by
    an assumed GPU speed-up), `low_s` to `high_s` its range on the measured device (the schedule alone;
    with back-offs after rejected steps and every Stage 2 trial)."""

    cpu: float
    gpu: float
    measured_on: str
    steps: int
    train_step_s: float  # one recovery iteration
    low_s: float | None = None
    high_s: float | None = None
    step_s: float | None = None  # one Stage 1 step: scoring, plan, recovery, evaluation
    recovery_iterations: int | None = None  # per step
    final_recovery_iterations: int | None = None


class InputSignature(_Frozen):
    """One input of the model: its name, dtype and per-sample shape."""

    name: str
    dtype: str
    shape: list[int]


class PreflightReport(_FromUpload):
    """What a compression job would face (core.run.preflight): sizes, what can be pruned, what can be reached."""

    macs: int
    params: int
    task: Task
    task_reason: str | None = None  # why auto chose the task; None when the caller named it
    metric: Metric  # what the budget applies to, for the data as given (with or without labels)
    budget: str  # the budget in words (the target's, or the task's default)
    num_classes: int | None  # classes the output scores, for the tasks that have them
    inputs: list[InputSignature]
    outputs: list[OutputRow]  # every output, kept as it is in the pruned model; the logits are one of them
    input_shape: list[int]  # of the first input, as a single-input model's page shows it
    input_dtype: str
    samples: int
    labeled: bool | None  # None without data
    prunable_groups: list[GroupRow]
    not_prunable: list[NotPrunableRow]
    blocks: list[BlockRow]
    reachable_reduction: dict[str, float]
    target: Target | None
    feasible: bool | None  # None without a target
    problems: list[str]
    estimate_seconds: Estimate
    notes: list[str]
    seconds: float
    input_format: str | None = None
    # how many held-out samples decide the budget (with data; for a default 1-point budget without a target)
    budget_resolution: BudgetResolution | None = None


def to_json(report: BaseModel) -> str:
    """A report as indented JSON, as report.json has always been written (json.dumps's formatting)."""
    return json.dumps(report.model_dump(mode="json"), indent=2)

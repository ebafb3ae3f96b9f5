"""The API's JSON as typed objects, mirroring the service's schemas (JobOut, ReportHeadline, Report,
PreflightReport) without importing them: the client installs without torch or the server.

Unknown fields are kept (``model_extra``), not refused, so a newer server does not break an older client.
"""

from __future__ import annotations

from datetime import datetime
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict


class _Tolerant(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class JobStatus(str, Enum):  # noqa: UP042  (StrEnum is 3.11+; the client supports 3.10)
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


FINISHED = frozenset({JobStatus.SUCCEEDED.value, JobStatus.FAILED.value, JobStatus.CANCELLED.value})


class Task(str, Enum):  # noqa: UP042
    """What the model does (the server's core.tasks.kinds.Task): it sets the quality metric and the budget's units."""

    AUTO = "auto"
    CLASSIFICATION = "classification"
    EMBEDDING = "embedding"
    DETECTION = "detection"
    SEGMENTATION = "segmentation"
    CAUSAL_LM = "causal-lm"
    GENERIC = "generic"


class DetectionDecoder(str, Enum):  # noqa: UP042
    """How a detector's outputs become boxes (the server's core.tasks.kinds.DetectionDecoder)."""

    AUTO = "auto"
    YOLOV5 = "yolov5"
    YOLOV8 = "yolov8"


# Metrics whose values are not fractions and whose budget is a share of the original's value
# (the server's Metric.is_fraction and Metric.relative): perplexity.
RELATIVE_METRICS = frozenset({"perplexity"})


class Progress(_Tolerant):
    stage: str | None = None
    step: int = 0
    total_steps: int = 0
    fraction: float = 0.0
    message: str | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None


class ErrorInfo(_Tolerant):
    """A failed job's error, and the body of every API error: `{"error": {"code", "message", "hint"}}`."""

    code: str
    message: str
    hint: str | None = None


class Artifact(_Tolerant):
    name: str
    size: int
    sha256: str
    url: str


class Metrics(_Tolerant):
    """The report's headline numbers, kept next to a succeeded job's status."""

    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    macs_reduction: float
    params_reduction: float
    accuracy_metric: str  # the task's metric (top1, recall_at_10, map50, miou, perplexity, ...)
    accuracy_before: float
    accuracy_after: float
    task: str = Task.CLASSIFICATION.value  # a server older than tasks ran classification only
    budget: str | None = None  # the budget in words
    latency_ms_before: dict[str, float]
    latency_ms_after: dict[str, float]
    onnx_max_abs_diff: float
    target_met: bool
    stop_reason: str
    message: str
    removed_blocks: list[str]
    device: str
    seconds: float
    pt2_error: str | None = None


class JobInfo(_Tolerant):
    """GET /v1/jobs/{id}: one job as the server last described it."""

    id: str
    name: str | None = None  # None from a server older than job names
    status: str  # a JobStatus value; a plain string so that a status added later still parses
    queue: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    progress: Progress
    error: ErrorInfo | None = None
    metrics: Metrics | None = None
    artifacts: list[Artifact]
    config: dict[str, Any]

    @property
    def finished(self) -> bool:
        return self.status in FINISHED

    @property
    def succeeded(self) -> bool:
        return self.status == JobStatus.SUCCEEDED.value


class JobPage(_Tolerant):
    jobs: list[JobInfo]
    next_cursor: str | None = None


class StepRecord(_Tolerant):
    stage: str
    step: int
    macs: int
    params: int
    accuracy: float
    seconds: float
    accepted: bool
    units_removed: int | None = None
    block: str | None = None
    divergence: float | None = None
    drift: float | None = None
    width_drift: float | None = None
    width_accuracy: float | None = None
    width_units_removed: int | None = None
    declined: str | None = None
    soft_agreement: float | None = None
    step_scale: float | None = None
    recovery_kept: bool | None = None


class LayerRow(_Tolerant):
    name: str
    channels_before: int
    channels_after: int
    divergence: float | None = None


class HeadRow(_Tolerant):
    name: str
    heads_before: int
    heads_after: int


class RemovedBlock(_Tolerant):
    name: str
    kind: str
    divergence: float


class PhaseCost(_Tolerant):
    work: str
    seconds: float
    peak_gpu_mb: float | None = None


class Report(Metrics):
    """GET /v1/jobs/{id}/report (report.json): the headline numbers and the rest. Nested option objects
    stay dicts."""

    eval_samples: int
    onnx_max_abs_diff_before: float
    onnx_bytes_before: int
    onnx_bytes_after: int
    blocks: list[RemovedBlock]
    layers: list[LayerRow]
    attention_heads: list[HeadRow]
    steps: list[StepRecord]
    target: dict[str, Any]
    reachable_reduction: dict[str, float]
    notes: list[str]
    options: dict[str, Any]
    resumed_at_step: int | None = None
    budget_resolution: dict[str, Any] | None = None
    soft_agreement_before: float | None = None
    soft_agreement_after: float | None = None
    input_format: str | None = None
    hf_pretrained: str | None = None
    hf_pretrained_error: str | None = None
    phases: list[PhaseCost] = []
    peak_rss_mb: float | None = None


class GroupRow(_Tolerant):
    name: str
    width: int
    min_width: int


class NotPrunableRow(_Tolerant):
    name: str
    type: str
    reason: str


class OutputRow(_Tolerant):
    name: str
    shape: list[int]


class BlockRow(_Tolerant):
    name: str
    kind: str


class Estimate(_Tolerant):
    cpu: float
    gpu: float
    measured_on: str
    steps: int
    train_step_s: float
    low_s: float | None = None
    high_s: float | None = None
    step_s: float | None = None
    recovery_iterations: int | None = None
    final_recovery_iterations: int | None = None


class InputSignature(_Tolerant):
    name: str
    dtype: str
    shape: list[int]


class Preflight(_Tolerant):
    """POST /v1/inspect: what a job on these files would face, without running it."""

    macs: int
    params: int
    task: str = Task.CLASSIFICATION.value  # a server older than tasks ran classification only
    metric: str = "top1"
    budget: str | None = None
    task_reason: str | None = None  # why auto chose the task; None when the job named it
    num_classes: int | None = None  # for the tasks that score classes
    inputs: list[InputSignature]
    outputs: list[OutputRow]
    input_shape: list[int]
    input_dtype: str
    samples: int
    labeled: bool | None = None
    prunable_groups: list[GroupRow]
    not_prunable: list[NotPrunableRow]
    blocks: list[BlockRow]
    reachable_reduction: dict[str, float]
    target: dict[str, Any] | None = None
    feasible: bool | None = None
    problems: list[str]
    estimate_seconds: Estimate
    budget_resolution: dict[str, Any] | None = None
    notes: list[str]
    seconds: float
    input_format: str | None = None

"""Request and response bodies of API v1."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core import CompressOptions, Target
from core.options import IntakeOptions

_DEFAULTS = CompressOptions()
_INTAKE = IntakeOptions()


class _Strict(BaseModel):
    # A misspelt option silently ignored would run a job the caller did not ask for.
    model_config = ConfigDict(extra="forbid")


class TargetIn(_Strict):
    macs_reduction: float | None = Field(None, gt=0, lt=1, description="fraction of MACs to remove")
    params_reduction: float | None = Field(None, gt=0, lt=1, description="fraction of parameters to remove")
    max_accuracy_drop: float = Field(Target().max_accuracy_drop, ge=0, le=1, description="absolute top-1 budget")


class RecoveryIn(_Strict):
    recovery_epochs: float | None = Field(None, ge=0)
    recovery_iterations: int | None = Field(None, ge=0)
    final_recovery_epochs: float = Field(_DEFAULTS.final_recovery_epochs, ge=0)
    final_recovery_iterations: int | None = Field(None, ge=0)
    batch_size: int = Field(_DEFAULTS.batch_size, ge=1)
    lr: float | None = Field(None, gt=0, description="None: 1e-3, or 1e-4 for models with attention")


class MethodIn(_Strict):
    seed: int = _DEFAULTS.seed
    round_to: int | None = Field(_DEFAULTS.round_to, ge=1)
    min_width_fraction: float = Field(_DEFAULTS.min_width_fraction, gt=0, le=1)
    max_steps: int = Field(_DEFAULTS.max_steps, ge=1)
    max_removals: int = Field(_DEFAULTS.max_removals, ge=0)
    layers_must_beat_width: bool = Field(
        _DEFAULTS.layers_must_beat_width,
        description="Stage 2 keeps a block removal only if it beats pruning width to the same size")
    group_scores: Literal["layer_sum", "mean"] = Field(
        _DEFAULTS.group_scores, description="how the scores of coupled layers combine")
    mean_compensation: bool = Field(
        _DEFAULTS.mean_compensation,
        description="score neurons and heads on their variation; fold their mean into the next bias")
    least_squares_compensation: bool = Field(
        _DEFAULTS.least_squares_compensation,
        description="with mean_compensation, also refit the next layer on the kept units (least squares)")
    allocation: Literal["auto", "drift", "scores"] = Field(
        _DEFAULTS.allocation,
        description="rank units across layers by measured drift per size removed, by their scores, "
                    "or auto (drift when attention heads are pruned)")
    ignored_layers: list[str] = []
    eval_fraction: float = Field(_DEFAULTS.eval_fraction, gt=0, lt=1, description="share of the data held out")
    time_budget_s: float | None = Field(None, gt=0)


class InputHints(_Strict):
    """How the uploaded files are read (core.options.IntakeOptions); shared by jobs and inspect."""

    architecture: str | None = Field(
        None, max_length=300, description='for safetensors weights, e.g. "idap:digits" or '
        '"torchvision:resnet18(num_classes=10)"')
    image_size: int | None = Field(None, ge=8, le=8192, description="side of image-folder images after resizing")
    mean: list[float] = Field(default_factory=lambda: list(_INTAKE.mean), min_length=1, max_length=3)
    std: list[float] = Field(default_factory=lambda: list(_INTAKE.std), min_length=1, max_length=3)
    text_column: str = Field(_INTAKE.text_column, min_length=1, max_length=200)
    label_column: str = Field(_INTAKE.label_column, min_length=1, max_length=200)
    max_length: int = Field(_INTAKE.max_length, ge=2, le=4096, description="tokens per text sample")


class JobConfig(InputHints):
    """The `config` part of POST /v1/jobs."""

    target: TargetIn
    stages: list[Literal["filters", "layers"]] = Field(default_factory=lambda: list(_DEFAULTS.stages), min_length=1)
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    recovery: RecoveryIn = RecoveryIn()
    method: MethodIn = MethodIn()
    export: list[Literal["onnx", "pt2"]] = Field(default_factory=lambda: ["onnx", "pt2"])
    webhook_url: str | None = Field(None, max_length=2000)
    idempotency_key: str | None = Field(None, min_length=1, max_length=200)

    @field_validator("webhook_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    def target_core(self) -> Target:
        return Target(**self.target.model_dump())

    def options_core(self) -> CompressOptions:
        recovery = self.recovery.model_dump()
        if recovery["recovery_epochs"] is None:
            recovery["recovery_epochs"] = _DEFAULTS.recovery_epochs
        method = self.method.model_dump()
        method["ignored_layers"] = tuple(method["ignored_layers"])
        return CompressOptions(stages=tuple(self.stages), device=self.device, **recovery, **method)


class InspectConfig(InputHints):
    """The `config` part of POST /v1/inspect: what the preflight needs, target optional."""

    target: TargetIn | None = None
    stages: list[Literal["filters", "layers"]] = Field(default_factory=lambda: list(_DEFAULTS.stages), min_length=1)
    method: MethodIn = MethodIn()

    def target_core(self) -> Target | None:
        return Target(**self.target.model_dump()) if self.target else None

    def options_core(self) -> CompressOptions:
        method = self.method.model_dump()
        method["ignored_layers"] = tuple(method["ignored_layers"])
        return CompressOptions(stages=tuple(self.stages), device="cpu", **method)


class ProgressOut(BaseModel):
    stage: str | None = None
    step: int = 0
    total_steps: int = 0
    fraction: float = 0.0
    message: str | None = None


class ErrorOut(BaseModel):
    code: str
    message: str
    hint: str | None = None


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str
    url: str


class JobOut(BaseModel):
    id: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    queue: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    progress: ProgressOut
    error: ErrorOut | None
    metrics: dict[str, Any] | None
    artifacts: list[ArtifactOut]
    config: dict[str, Any]

    @field_validator("created_at", "updated_at", "started_at", "finished_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        # SQLite hands timestamps back naive; they were written in UTC.
        return value.replace(tzinfo=UTC) if value is not None and value.tzinfo is None else value


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None


class WebhookDeliveryOut(BaseModel):
    event_id: str
    event_type: str
    url: str
    attempt: int
    status_code: int | None
    error: str | None
    succeeded: bool
    will_retry: bool
    created_at: datetime


class WebhookDeliveryList(BaseModel):
    deliveries: list[WebhookDeliveryOut]

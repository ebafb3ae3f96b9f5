"""The job config: what POST /v1/jobs accepts, what the worker validates again, and how it maps to core's options."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator

from core.options import (
    Allocation,
    CompressOptions,
    GroupScores,
    IntakeOptions,
    NormStatistics,
    Precision,
    Stage,
    Target,
)
from core.tasks.kinds import DetectionDecoder, Task
from domain.settings import Settings

_DEFAULTS = CompressOptions()
_INTAKE = IntakeOptions()


class ExportFormat(StrEnum):
    """The model artifacts a job can ask for (report.json always comes)."""

    ONNX = "onnx"
    PT2 = "pt2"


# Every number has both bounds: a value no run could use (seed 2**70, a million epochs) is a 422
# that names the field, never an overflow in the worker or the database.
MAX_SEED = 2**32 - 1
MAX_EPOCHS = 1000.0
MAX_ITERATIONS = 10_000_000
MAX_BATCH = 65_536
MAX_STEPS = 10_000
MAX_TIME_BUDGET_S = 30 * 24 * 3600.0
MAX_LAYERS = 10_000
MAX_JOB_NAME = 200
Name = Annotated[str, Field(min_length=1, max_length=300)]


class _Strict(BaseModel):
    # A misspelt option silently ignored would run a job the caller did not ask for; NaN and
    # infinities are refused as what they are ("Input should be a finite number"), not as out of range.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class TargetIn(_Strict):
    macs_reduction: float | None = Field(default=None, gt=0, lt=1, description="fraction of MACs to remove")
    params_reduction: float | None = Field(default=None, gt=0, lt=1, description="fraction of parameters to remove")
    max_accuracy_drop: float | None = Field(
        default=None, ge=0, le=1,
        description="budget on the task's quality metric (top-1 points, cosine, mAP or mIoU points, relative error, "
                    "or a relative perplexity increase for causal-lm); unset: the task's default")


class RecoveryIn(_Strict):
    recovery_epochs: float | None = Field(default=None, ge=0, le=MAX_EPOCHS)
    recovery_iterations: int | None = Field(default=None, ge=0, le=MAX_ITERATIONS)
    final_recovery_epochs: float = Field(default=_DEFAULTS.final_recovery_epochs, ge=0, le=MAX_EPOCHS)
    final_recovery_iterations: int | None = Field(default=None, ge=0, le=MAX_ITERATIONS)
    batch_size: int = Field(default=_DEFAULTS.batch_size, ge=1, le=MAX_BATCH)
    lr: float | None = Field(default=None, gt=0, le=10, description="None: 1e-3, or 1e-4 for models with attention")
    precision: Precision = Field(
        default=_DEFAULTS.precision,
        description="arithmetic of recovery's forward passes: auto is bf16 autocast on CUDA devices that support "
                    "it, fp32 elsewhere")
    norm_statistics: NormStatistics = Field(
        default=_DEFAULTS.norm_statistics,
        description="BatchNorm statistics in recovery: update them as in training, keep them frozen, or auto "
                    "(frozen in a network of >= 1 M parameters when fewer than 5,000 samples are left for recovery)")


class MethodIn(_Strict):
    seed: int = Field(default=_DEFAULTS.seed, ge=0, le=MAX_SEED)
    round_to: int | None = Field(default=_DEFAULTS.round_to, ge=1, le=MAX_BATCH)
    min_width_fraction: float = Field(default=_DEFAULTS.min_width_fraction, gt=0, le=1)
    max_steps: int = Field(default=_DEFAULTS.max_steps, ge=1, le=MAX_STEPS)
    max_removals: int = Field(default=_DEFAULTS.max_removals, ge=0, le=MAX_STEPS)
    layers_must_beat_width: bool = Field(
        default=_DEFAULTS.layers_must_beat_width,
        description="Stage 2 keeps a block removal only if it beats pruning width to the same size")
    group_scores: GroupScores = Field(
        default=_DEFAULTS.group_scores, description="how the scores of coupled layers combine")
    mean_compensation: bool = Field(
        default=_DEFAULTS.mean_compensation,
        description="score neurons and heads on their variation; fold their mean into the next bias")
    least_squares_compensation: bool = Field(
        default=_DEFAULTS.least_squares_compensation,
        description="with mean_compensation, also refit the next layer on the kept units (least squares)")
    allocation: Allocation = Field(
        default=_DEFAULTS.allocation,
        description="rank units across layers by measured drift per size removed, by their scores, "
                    "or auto (drift when attention heads are pruned)")
    ignored_layers: list[Name] = Field(default=[], max_length=MAX_LAYERS)
    eval_fraction: float = Field(default=_DEFAULTS.eval_fraction, gt=0, lt=1, description="share of the data held out")
    time_budget_s: float | None = Field(default=None, gt=0, le=MAX_TIME_BUDGET_S)


class InputHints(_Strict):
    """How the uploaded files are read (core.options.IntakeOptions) and what the model's outputs are (its task,
    and the output the task measures); shared by jobs and inspect."""

    architecture: str | None = Field(
        default=None, max_length=300, description='for safetensors weights, e.g. "idap:digits" or '
        '"torchvision:resnet18(num_classes=10)"')
    image_size: int | None = Field(default=None, ge=8, le=8192,
                                   description="side of image-folder images after resizing")
    mean: list[Annotated[float, Field(ge=-1e6, le=1e6)]] = Field(
        default_factory=lambda: list(_INTAKE.mean), min_length=1, max_length=3)
    std: list[Annotated[float, Field(gt=0, le=1e6)]] = Field(
        default_factory=lambda: list(_INTAKE.std), min_length=1, max_length=3)
    text_column: str = Field(default=_INTAKE.text_column, min_length=1, max_length=200)
    label_column: str = Field(default=_INTAKE.label_column, min_length=1, max_length=200)
    max_length: int = Field(default=_INTAKE.max_length, ge=2, le=4096, description="tokens per text sample")
    task: Task = Field(
        default=Task.AUTO,
        description="what the model does, which sets the quality metric, the budget's units and recovery's loss; "
                    "auto infers it from the outputs and the model class (the preflight and the report say which)")
    detection_decoder: DetectionDecoder = Field(
        default=DetectionDecoder.AUTO,
        description="how a detector's outputs become boxes: auto reads torchvision's or outputs named "
                    "boxes/scores/labels (a raw head is compared as dense outputs); yolov5/yolov8 decode an exported "
                    "raw YOLO head")
    output: str | None = Field(
        default=None, min_length=1, max_length=200,
        description='the model output the task measures (class logits, embedding, map), for a model with several: '
        'a dict key, or "output_N" for the Nth of a tuple; default: the task\'s choice (the first, a ModelOutput\'s '
        'logits)')


class JobConfig(InputHints):
    """The `config` part of POST /v1/jobs."""

    name: str | None = Field(default=None, min_length=1, max_length=MAX_JOB_NAME,
                             description="a label for people; default: the uploaded model file's name")
    target: TargetIn
    stages: list[Stage] = Field(default_factory=lambda: list(_DEFAULTS.stages), min_length=1, max_length=len(Stage))
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    recovery: RecoveryIn = RecoveryIn()
    method: MethodIn = MethodIn()
    export: list[ExportFormat] = Field(default_factory=lambda: list(ExportFormat), max_length=len(ExportFormat))
    webhook_url: str | None = Field(default=None, max_length=2000)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)

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
        return CompressOptions(stages=tuple(self.stages), device=self.device, task=self.task,
                               detection_decoder=self.detection_decoder, output=self.output, **recovery, **method)


def intake_options(settings: Settings, hints: InputHints) -> IntakeOptions:
    """core's intake options: the limits come from the settings, the hints from the job (or inspect) config."""
    return IntakeOptions(
        architecture=hints.architecture,
        allow_pickle=settings.allow_pickle,
        image_size=hints.image_size,
        mean=tuple(hints.mean),
        std=tuple(hints.std),
        text_column=hints.text_column,
        label_column=hints.label_column,
        max_length=hints.max_length,
        max_file_bytes=settings.max_upload_bytes,
        max_zip_members=settings.max_zip_members,
        max_unpacked_bytes=settings.max_unpacked_bytes,
        max_samples=settings.max_samples,
    )

"""What the caller asks `compress` to do: the target and the knobs of the method."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar

from core.errors import OptionsError
from core.tasks.kinds import DetectionDecoder, Task


class Stage(StrEnum):
    FILTERS = "filters"  # Stage 1: iterative divergence-aware filter pruning
    LAYERS = "layers"  # Stage 2: block removal


class Criterion(StrEnum):
    """How units are scored: divergence is IDAP++; the others are torch-pruning's criteria, kept for benchmarks."""

    DIVERGENCE = "divergence"
    L2 = "l2"
    TAYLOR = "taylor"
    RANDOM = "random"
    FPGM = "fpgm"  # distance to the layer's geometric median (He et al. 2019)
    LAMP = "lamp"  # layer-adaptive magnitude (Lee et al. 2021): its own normaliser ranks across layers
    BN_SCALE = "bn_scale"  # |γ| of the BatchNorm after the channel (network slimming, Liu et al. 2017)


class GroupScores(StrEnum):
    """How coupled layers' unit scores combine (see CompressOptions.group_scores)."""

    AUTO = "auto"
    LAYER_SUM = "layer_sum"
    MEAN = "mean"


class NormStatistics(StrEnum):
    """What recovery does with BatchNorm statistics (see CompressOptions.norm_statistics)."""

    AUTO = "auto"
    UPDATE = "update"
    FROZEN = "frozen"


class Augmentation(StrEnum):
    """Whether recovery sees augmented copies of the calibration inputs (see CompressOptions.augmentation)."""

    AUTO = "auto"
    ON = "on"
    OFF = "off"


class Allocation(StrEnum):
    """How Stage 1 ranks units of different groups against each other (see CompressOptions.allocation)."""

    AUTO = "auto"
    DRIFT = "drift"
    SCORES = "scores"


class Precision(StrEnum):
    """The arithmetic of recovery's forward passes (see CompressOptions.precision)."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"


Choice = TypeVar("Choice", bound=StrEnum)


def _member(choices: type[Choice], value: object) -> Choice | object:
    """The member of `choices` that `value` names, or `value` itself, for validate() to refuse."""
    try:
        return choices(value) if isinstance(value, str) else value
    except ValueError:
        return value


def _shown(values: Iterable[object]) -> list[object]:
    """`values` as the caller wrote them, for error messages."""
    return [value.value if isinstance(value, StrEnum) else value for value in values]


def parse_stages(text: str) -> tuple[Stage, ...]:
    """The stages of a comma-separated list such as "filters,layers" (the CLI's --stages)."""
    return _checked_stages(tuple(name.strip() for name in text.split(",")))


def _checked_stages(stages: Iterable[object]) -> tuple[Stage, ...]:
    parsed = [_member(Stage, stage) for stage in stages]
    members = tuple(stage for stage in parsed if isinstance(stage, Stage))
    if len(members) < len(parsed) or not members:
        raise OptionsError(
            f"Unknown or empty stages {_shown(parsed)}.",
            hint="Use 'filters', 'layers' or 'filters,layers'.",
        )
    if len(set(members)) != len(members):
        raise OptionsError(f"Stage listed twice in {_shown(parsed)}.", hint="List each stage once.")
    return members


@dataclass(frozen=True)
class Target:
    """Fractions to remove. At least one of the size targets must be set.

    `max_accuracy_drop` is the budget on the task's quality metric on the held-out split
    (core.tasks.kinds.Metric.describe_budget): absolute top-1 for a classifier (0.01 = one point;
    without labels, top-1 agreement with the original), cosine similarity, mAP@0.5 or mIoU points,
    relative error, or a relative perplexity increase for a language model (0.1 = 10 %). None: the
    task's default (README, Tasks).
    """

    macs_reduction: float | None = None
    params_reduction: float | None = None
    max_accuracy_drop: float | None = None

    def validate(self) -> None:
        if self.macs_reduction is None and self.params_reduction is None:
            raise OptionsError(
                "No size target given.",
                hint="Set macs_reduction and/or params_reduction (fractions to remove, e.g. 0.5).",
            )
        for name in ("macs_reduction", "params_reduction"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise OptionsError(
                    f"{name} must be a fraction between 0 and 1 (exclusive), got {value}.",
                    hint="Use e.g. 0.5 to remove half.",
                )
        if self.max_accuracy_drop is not None and not 0.0 <= self.max_accuracy_drop <= 1.0:
            raise OptionsError(
                f"max_accuracy_drop must be between 0 and 1, got {self.max_accuracy_drop}.",
                hint="It is in the task's metric: e.g. 0.01 for one point of top-1, 0.1 for 10 % more perplexity.",
            )

    def with_budget(self, default: float) -> Target:
        """This target with its budget set: `default` (the task's) when it has none."""
        if self.max_accuracy_drop is not None:
            return self
        return Target(self.macs_reduction, self.params_reduction, default)

    @property
    def budget(self) -> float:
        if self.max_accuracy_drop is None:
            raise ValueError("The budget is set by with_budget for the run's task.")
        return self.max_accuracy_drop


@dataclass(frozen=True)
class CompressOptions:
    """Knobs of the IDAP++ pipeline; defaults follow ../shared/method/IDAP++.md."""

    stages: tuple[Stage, ...] = (Stage.FILTERS, Stage.LAYERS)
    # What the model does, which decides the quality metric, the budget's units and recovery's loss
    # (core.tasks); auto infers it from the model's outputs and class.
    task: Task = Task.AUTO
    # How a detector's outputs become boxes (core.tasks.kinds.DetectionDecoder); only the detection task reads it.
    detection_decoder: DetectionDecoder = DetectionDecoder.AUTO
    device: str = "auto"
    seed: int = 0
    criterion: Criterion = Criterion.DIVERGENCE
    # Share of the size target that Stage 1 takes before Stage 2 runs (when both run);
    # Stage 1 closes whatever gap Stage 2 leaves. With 1.0, Stage 2 would only ever run
    # after Stage 1 stopped early, and depth would never be traded against width.
    filter_share: float = 0.7
    # Stage 1 schedule: rho_t = p0 * (1 + t/T) ** alpha of the remaining units per step.
    p0: float = 0.1
    alpha: float = 1.5
    max_steps: int = 20
    # A Stage 1 step that breaks the accuracy budget is rolled back and retried from the same model
    # at half its size, down to this fraction of the prunable units; the steps after it keep the
    # smaller size. Only a step of this size that still breaks the budget stops Stage 1.
    min_step_fraction: float = 0.01
    # Never prune a layer below this fraction of its original width (and min_channels).
    min_width_fraction: float = 0.125
    min_channels: int = 1
    # How coupled layers' unit scores combine (method §2 normalises per layer): "layer_sum" divides
    # each producing layer's scores by that layer's mean and sums them over the group, so a
    # residual-stream channel written by 12 layers weighs 12 of one MLP layer's neurons; "mean"
    # averages raw scores over the group and normalises the group (the first implementation).
    # "auto" is layer_sum where attention heads are pruned (MiniLM kept its hidden size and 2 points
    # with it) and mean otherwise (the Fashion-MNIST ResNet's validation split, three seeds: +0.28 and
    # +0.27 point over layer_sum at -70 % and -80 % MACs; README, Decisions).
    group_scores: GroupScores = GroupScores.AUTO
    # Units whose activation is exactly the input of one Linear (MLP neurons, attention heads) are
    # scored on their variation around the calibration mean, and that mean is folded into the
    # Linear's bias when they go: a unit with a constant output then costs nothing to remove. Any
    # other Linear that loses input columns (every reader of a residual-stream channel) does the same.
    mean_compensation: bool = True
    # With mean compensation, the consumer (and every reader) also refits the kept inputs' weights to
    # predict what the removed ones varied by (ridge least squares on the calibration covariance).
    least_squares_compensation: bool = True
    # How Stage 1 ranks units of different groups against each other (divergence only): "scores"
    # ranks the scores as they are (method §2); "drift" first probes every group, removing its
    # lowest-scoring units from a copy, and ranks estimated drift per unit of the size target
    # (core/run/allocation.py); "auto" is drift when attention heads are pruned (heads, MLP neurons and
    # hidden-size channels, which per-layer normalised scores cannot compare) and in large pretrained
    # models (>= 1 M parameters, whose narrow layers the scores cut as readily as wide ones), scores otherwise.
    allocation: Allocation = Allocation.AUTO
    # ONNX Runtime's CPU convolutions work on blocks of 8 channels: a 29-wide layer ran 2x slower
    # than a 32-wide one in our measurements, so widths stay multiples of 8 by default (1 = off).
    round_to: int | None = 8
    ignored_layers: tuple[str, ...] = ()
    # The output the task measures (the class logits, the embedding, the map), by its name in
    # core.graph.outputs.named_outputs (a dict key, "output_1" for a tuple's second item); None: the task's
    # choice (a classifier's first output or a ModelOutput's logits). Every output keeps its shape and is
    # exported.
    output: str | None = None
    # Stage 2
    max_removals: int = 8
    # Stage 2 keeps a block removal only when its outputs on the held-out split drift less (KL)
    # from the original's than those of one Stage 1 step to the same size (else Stage 2 stops and
    # Stage 1 finishes the target). On MiniLM removed layers cost 2-4 points against width; the
    # order is kept.
    layers_must_beat_width: bool = True
    # Recovery budget per step: epochs over the recovery split, or a fixed iteration
    # count when `recovery_iterations` is set (it wins over epochs and the floor).
    recovery_epochs: float = 1.0
    recovery_iterations: int | None = None
    final_recovery_epochs: float = 2.0
    final_recovery_iterations: int | None = None
    # Floors of optimizer iterations for a budget given in epochs, whatever the data's size: one
    # epoch of 250 samples is 4 iterations at batch 64, too few to recover anything (issue #17).
    min_recovery_iterations: int = 50
    min_final_recovery_iterations: int = 200
    # Recovery on augmented copies of the inputs (flips, crops, mixing for images; token swaps for
    # token ids): "auto" augments photo-sized images (sides >= 32) when the recovery split is small
    # (core.recovery.augment); "on" also augments token data and other images; never scoring or evaluation.
    augmentation: Augmentation = Augmentation.AUTO
    # BatchNorm layers during recovery: "update" normalises with each batch's statistics and updates
    # the running ones, as in training; "frozen" normalises with the running statistics and keeps them;
    # "auto" freezes them in a large pretrained network (>= 1 M parameters, as for the learning rate) when
    # the recovery split is small (core.recovery.augment.SMALL_DATA), where a batch's statistics are not
    # the population its statistics came from: one recovered step of EfficientNet-Lite0 on 240 photo crops
    # kept 36 % top-1 agreement with the original updating them and 82 % frozen. A small network trained on
    # the user's own data needs them updated after its channels change (README, Decisions).
    norm_statistics: NormStatistics = NormStatistics.AUTO
    batch_size: int = 64
    # Recovery's forward passes (student and teacher) under bfloat16 autocast, losses and weights in
    # float32: "auto" is bf16 on CUDA devices that support it (about twice the throughput on tensor
    # cores), fp32 elsewhere; "bf16" forces it (on a CPU too, where it is mostly slower).
    precision: Precision = Precision.AUTO
    # None: 1e-3 (method §5), 1e-5 for large pretrained models (>= 1 M parameters; README, Decisions),
    # or 1e-4 for models with attention: fine-tuned transformers lost
    # their fine-tuning at 1e-3 in our MiniLM runs (accuracy fell to chance after one step).
    lr: float | None = None
    weight_decay: float = 1e-4
    kd_temperature: float = 3.0
    # Weight of the KL term on the teacher's logits next to CE when the data has labels (without
    # labels it is the whole task loss). Method §5 has CE + features only; on MiniLM at -40 % of the
    # encoder, adding it cut the held-out drop from 4.5 to 1.0 points (README, Decisions).
    kd_weight: float = 1.0
    feature_weight: float = 0.5
    # Data use
    eval_fraction: float = 0.2
    calibration_samples: int = 512
    # Metrics
    latency_runs: int = 20
    latency_batch: int = 32
    # Wall-clock budget for the whole run in seconds (None = unlimited).
    time_budget_s: float | None = None

    def __post_init__(self) -> None:
        # Callers that read options as text (the API's JSON, benchmarks) pass the choices' names; the
        # fields hold members. A name of no member stays as it is, for validate() to refuse.
        object.__setattr__(self, "stages", tuple(_member(Stage, stage) for stage in self.stages))
        for name, choices in (("criterion", Criterion), ("group_scores", GroupScores), ("allocation", Allocation),
                              ("augmentation", Augmentation), ("norm_statistics", NormStatistics), ("task", Task),
                              ("precision", Precision),
                              ("detection_decoder", DetectionDecoder)):
            object.__setattr__(self, name, _member(choices, getattr(self, name)))

    def validate(self) -> None:
        _checked_stages(self.stages)
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise OptionsError(f"Unknown device {self.device!r}.", hint="Use auto, cpu or cuda.")
        if not isinstance(self.group_scores, GroupScores):
            raise OptionsError(f"Unknown group_scores {self.group_scores!r}.",
                               hint=f"Use one of {', '.join(GroupScores)}.")
        if not isinstance(self.allocation, Allocation):
            raise OptionsError(f"Unknown allocation {self.allocation!r}.",
                               hint=f"Use one of {', '.join(Allocation)}.")
        if not isinstance(self.augmentation, Augmentation):
            raise OptionsError(f"Unknown augmentation {self.augmentation!r}.",
                               hint=f"Use one of {', '.join(Augmentation)}.")
        if not isinstance(self.norm_statistics, NormStatistics):
            raise OptionsError(f"Unknown norm_statistics {self.norm_statistics!r}.",
                               hint=f"Use one of {', '.join(NormStatistics)}.")
        if not isinstance(self.precision, Precision):
            raise OptionsError(f"Unknown precision {self.precision!r}.",
                               hint=f"Use one of {', '.join(Precision)}.")
        if not isinstance(self.task, Task):
            raise OptionsError(f"Unknown task {self.task!r}.", hint=f"Use one of {', '.join(Task)}.")
        if not isinstance(self.detection_decoder, DetectionDecoder):
            raise OptionsError(f"Unknown detection_decoder {self.detection_decoder!r}.",
                               hint=f"Use one of {', '.join(DetectionDecoder)}.")
        if not isinstance(self.criterion, Criterion):
            raise OptionsError(f"Unknown criterion {self.criterion!r}.", hint=f"Use one of {', '.join(Criterion)}.")
        checks = [
            (0.0 < self.filter_share <= 1.0, "filter_share must be in (0, 1]"),
            (0.0 < self.p0 < 1.0, "p0 must be in (0, 1)"),
            (self.alpha >= 0.0, "alpha must be >= 0"),
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (0.0 < self.min_step_fraction <= 1.0, "min_step_fraction must be in (0, 1]"),
            (0.0 < self.min_width_fraction <= 1.0, "min_width_fraction must be in (0, 1]"),
            (self.min_channels >= 1, "min_channels must be >= 1"),
            (self.round_to is None or self.round_to >= 1, "round_to must be >= 1"),
            (self.max_removals >= 0, "max_removals must be >= 0"),
            (self.recovery_epochs >= 0, "recovery_epochs must be >= 0"),
            (self.recovery_iterations is None or self.recovery_iterations >= 0,
             "recovery_iterations must be >= 0"),
            (self.final_recovery_epochs >= 0, "final_recovery_epochs must be >= 0"),
            (self.final_recovery_iterations is None or self.final_recovery_iterations >= 0,
             "final_recovery_iterations must be >= 0"),
            (min(self.min_recovery_iterations, self.min_final_recovery_iterations) >= 0,
             "min_recovery_iterations and min_final_recovery_iterations must be >= 0"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr is None or self.lr > 0, "lr must be > 0"),
            (self.kd_temperature > 0, "kd_temperature must be > 0"),
            (self.kd_weight >= 0, "kd_weight must be >= 0"),
            (0.0 < self.eval_fraction < 1.0, "eval_fraction must be in (0, 1)"),
            (self.calibration_samples >= 1, "calibration_samples must be >= 1"),
            (self.latency_runs >= 1, "latency_runs must be >= 1"),
            (self.latency_batch >= 1, "latency_batch must be >= 1"),
            (self.time_budget_s is None or self.time_budget_s > 0, "time_budget_s must be > 0"),
            (self.output is None or self.output.strip() != "", "output must name one of the model's outputs"),
        ]
        for ok, message in checks:
            if not ok:
                raise OptionsError(message + ".", hint="Fix the option or leave it at its default.")


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class IntakeOptions:
    """How uploaded files become a model and a dataset, and the limits that keep that safe.

    `allow_pickle` lets pickled modules in: unpickling runs code from the file, so a service
    turns it on only for uploaders it trusts (IDAP_ALLOW_PICKLE); the CLI, loading the user's
    own files, turns it on.
    """

    architecture: str | None = None
    allow_pickle: bool = False
    # Image-folder data: side length (None: the model's fixed input size if known, else 224)
    # and per-channel normalisation.
    image_size: int | None = None
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    # Text data (.jsonl / .csv) for models that ship a tokenizer.
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = 128
    # Limits on what an upload may make us read or unpack.
    max_file_bytes: int = 2 << 30
    max_zip_members: int = 20_000
    max_unpacked_bytes: int = 4 << 30
    max_samples: int = 50_000

    def validate(self) -> None:
        checks = [
            (self.image_size is None or self.image_size >= 8, "image_size must be >= 8"),
            (len(self.mean) == len(self.std) and len(self.mean) in (1, 3), "mean and std need 1 or 3 values each"),
            (all(s > 0 for s in self.std), "std values must be > 0"),
            (self.max_length >= 2, "max_length must be >= 2"),
            (min(self.max_file_bytes, self.max_zip_members, self.max_unpacked_bytes, self.max_samples) >= 1,
             "limits must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise OptionsError(message + ".", hint="Fix the option or leave it at its default.")

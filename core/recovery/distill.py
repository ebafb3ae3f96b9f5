"""Recovery fine-tuning by knowledge distillation from the model before the step (method §5)."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from core.accel import autocast, channels_last, memory_layout
from core.data import Dataset, resident, to_device
from core.options import NormStatistics, Precision
from core.progress import Reporter
from core.recovery.augment import SMALL_DATA, Augmenter
from core.recovery.features import FeatureTap, feature_loss
from core.recovery.rates import scaled_param_groups
from core.tasks.base import TaskHandler


def _shuffled_batches(n: int, batch_size: int, generator: torch.Generator,
                      device: torch.device) -> Iterator[torch.Tensor]:
    """Sample indices batch by batch, on `device` (the data's): one copy per epoch, none per batch."""
    while True:
        order = torch.randperm(n, generator=generator).to(device)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield order[i : i + batch_size]


def iterations_for(n: int, batch_size: int, epochs: float, iterations: int | None, floor: int = 0) -> int:
    """Optimizer iterations of a recovery: `iterations` when given, else `epochs` over `n` samples but at
    least `floor` (no recovery at all when epochs is 0)."""
    if iterations is not None:
        return iterations
    if epochs <= 0:
        return 0
    return max(floor, math.ceil(epochs * n / min(batch_size, n)))


def freezes_norms(recovery: Dataset, mode: NormStatistics, pretrained: bool) -> bool:
    """Whether recovery on `recovery` (the recovery split) keeps BatchNorm statistics as they are under `mode`
    (CompressOptions.norm_statistics): with "auto", for a `pretrained` network (core.run.stages.is_large)
    on a small split."""
    return mode == NormStatistics.FROZEN or (mode == NormStatistics.AUTO and pretrained and len(recovery) < SMALL_DATA)


def freeze_norms(model: nn.Module) -> None:
    """BatchNorms normalise with their running statistics and leave them as they are; their affine
    parameters still train."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def recover(
    student: nn.Module,
    teacher: nn.Module,
    data: Dataset,
    feature_points: list[str],
    iterations: int,
    *,
    device: torch.device,
    batch_size: int,
    lr: float,
    weight_decay: float,
    temperature: float,
    kd_weight: float,
    feature_weight: float,
    seed: int,
    reporter: Reporter,
    task: TaskHandler,
    augment: Augmenter | None = None,
    precision: Precision = Precision.FP32,
    frozen_norms: bool = False,
) -> None:
    """Fine-tune `student` in place for `iterations` steps.

    loss = the task's loss (core.tasks: its own loss against labels + kd_weight·distillation on the outputs,
    distillation alone without labels) + w·Σ L1(adapter(f_s), f_t) on the feature points.
    With `augment`, teacher and student see the same augmented batch (core.recovery.augment); with
    `frozen_norms`, the student's BatchNorms keep their statistics (`freeze_norms`). Each module learns at
    `lr`, scaled down where its weights are far below the model's scale (core.recovery.rates).
    The forward passes autocast to `precision` (core.accel: the losses are taken in float32, the weights stay
    float32) and run in channels_last where core.accel.uses_channels_last says so. The data lives on the
    device for the whole recovery when it fits (core.data.resident).
    Cancellation is checked every iteration.
    """
    if iterations <= 0:
        return
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student.train(task.train_mode)
    if frozen_norms:
        freeze_norms(student)
    s_tap, t_tap = FeatureTap(student, feature_points), FeatureTap(teacher, feature_points)
    adapters: dict[str, nn.Module | None] = {}
    optimizer = torch.optim.AdamW(scaled_param_groups(student, lr), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    home = device if resident(data) else torch.device("cpu")
    inputs, y = data.inputs.to(home), None if data.y is None else data.y.to(home)
    batches = _shuffled_batches(len(data), min(batch_size, len(data)), generator, home)
    # its own generator, so that augmenting leaves the batches' order as it is
    augment_generator = torch.Generator().manual_seed(seed + 1)
    layout = memory_layout([student, teacher], inputs[:1], device)
    try:
        with layout as nhwc:
            for _ in range(iterations):
                reporter.check_cancel()
                index = next(batches)
                x = to_device(inputs[index], device)
                if augment is not None:
                    x = augment(x, augment_generator)
                if nhwc:
                    x = channels_last(x)
                labels = None if y is None else y[index].to(device, non_blocking=True)
                with autocast(precision, device):
                    loss = task.recovery_loss(student, teacher, x, labels, temperature, kd_weight)
                    loss = loss + feature_weight * feature_loss(s_tap, t_tap, adapters, optimizer, device)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        s_tap.close()
        t_tap.close()
        student.eval()
        for p in teacher.parameters():
            p.requires_grad_(True)

"""What a task decides in a run: what its outputs must look like, what the held-out split records of a
model's outputs, the quality measure the accuracy budget applies to, how far a candidate drifts from the
original, and the loss recovery distils with."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from core.data import Dataset, device_batches
from core.inputs import Inputs
from core.tasks.kinds import Metric, Task

# What a task keeps of a model's outputs on a split (a tensor with samples on dim 0, or a list of samples):
# small enough to hold for the whole held-out split, enough to measure quality and drift.
Records = Any


class TaskHandler(ABC):
    """One task's rules. Built for a run with the output it measures (CompressOptions.output; None: the
    task's choice), then checked against the model's outputs on real data (`check`), which may fix what
    the rest reads (a segmenter's map as logits or probabilities, say)."""

    task: ClassVar[Task]
    # max_accuracy_drop when the caller leaves it unset, in the units of the task's metric (README, Tasks)
    default_budget: ClassVar[float]
    # Whether `drift` changes smoothly with the weights, so that small probes can be ranked by it
    # (core.run.allocation); a count of matched detections cannot.
    smooth_drift: ClassVar[bool] = True
    # Whether recovery runs the student in training mode (dropout, batch-norm statistics): a torchvision
    # detector in training mode computes its losses instead of its outputs, and needs targets for it.
    train_mode: ClassVar[bool] = True
    # Samples per forward pass when a split is measured: token logits and per-pixel maps are large.
    eval_batch_size: ClassVar[int] = 256

    def __init__(self, output: str | None = None) -> None:
        self.output = output

    def may_augment(self, labeled: bool) -> bool:
        """Whether recovery may augment the inputs (core.recovery.augment): not where the labels it trains on
        are tied to positions of the input that a crop or a token swap moves (masks, boxes, next tokens)."""
        return True

    @abstractmethod
    def metric(self, labeled: bool) -> Metric:
        """The measure the budget applies to, with labels or against the original's outputs."""

    @abstractmethod
    def check(self, output: Any, data: Dataset) -> str:
        """Raise DataError/OptionsError when `output` (the model's, on a few samples of `data`) or the data's
        labels do not fit the task; else a short description of what is measured ("10 class logits")."""

    @abstractmethod
    def record(self, output: Any, batch: Inputs) -> Records:
        """What the held-out split keeps of `output`, the model's output on `batch`, on the batch's device
        (`collect` moves the split's records to the CPU at once)."""

    def merge(self, records: list[Records]) -> Records:
        """One split's records from its batches'."""
        return torch.cat(records)

    @abstractmethod
    def quality(self, records: Records, reference: Records, labels: torch.Tensor | None) -> float:
        """The task's metric on the split: against `labels` when given, else against the original's `reference`."""

    @abstractmethod
    def agreement(self, records: Records, reference: Records) -> float:
        """A smooth measure of how close `records` are to the original's (1.0: the same)."""

    @abstractmethod
    def drift(self, records: Records, reference: Records) -> float:
        """How far `records` are from the original's `reference` (0: not at all), for ranking candidates."""

    @abstractmethod
    def loss(self, student: Any, teacher: Any, batch: Inputs, labels: torch.Tensor | None, temperature: float,
             kd_weight: float) -> torch.Tensor:
        """Recovery's task loss: distillation on the outputs, plus the task's own loss against `labels`."""

    def recovery_loss(self, student: nn.Module, teacher: nn.Module, batch: Inputs, labels: torch.Tensor | None,
                      temperature: float, kd_weight: float) -> torch.Tensor:
        """`loss` on both models' outputs for `batch`; a task whose outputs cannot carry gradients to compare
        (a detector's post-NMS boxes) reads what it distils elsewhere."""
        with torch.no_grad():
            target = batch.call(teacher)
        return self.loss(batch.call(student), target, batch, labels, temperature, kd_weight)

    @abstractmethod
    def taylor_loss(self, output: Any, batch: Inputs, labels: torch.Tensor | None) -> torch.Tensor:
        """The loss whose gradients the Taylor baseline scores units by (criterion "taylor")."""

    def num_classes(self, output: Any) -> int | None:
        """Classes the output scores, where the task has them."""
        return None


@torch.no_grad()
def collect(model: nn.Module, x: Inputs, device: torch.device, task: TaskHandler,
            batch_size: int | None = None) -> Records:
    """What `task` records of `model`'s outputs on `x` (in eval mode), batch by batch, on the CPU: copied there
    once at the end, since a copy per batch would wait for the device every batch."""
    model.eval()
    records = [task.record(batch.call(model), batch)
               for batch in device_batches(x, device, batch_size or task.eval_batch_size)]
    return _on_cpu(task.merge(records))


def _on_cpu(records: Records) -> Records:
    if isinstance(records, torch.Tensor):
        return records.cpu()
    if isinstance(records, dict):
        return {key: _on_cpu(value) for key, value in records.items()}
    if isinstance(records, list):
        return [_on_cpu(value) for value in records]
    return records

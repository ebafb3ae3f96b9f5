"""Any tensors out: every output (or the one named) compared with the original's, as a relative error."""

from __future__ import annotations

from typing import Any

import torch

from core.data import Dataset
from core.errors import DataError, OptionsError
from core.graph.outputs import named_outputs, select_output
from core.inputs import Inputs
from core.tasks.base import TaskHandler
from core.tasks.kinds import Metric, Task


def normalised_mse(student: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the target's mean square: outputs of any scale weigh alike."""
    target = target.float()
    return (student.float() - target).pow(2).mean() / (target.pow(2).mean() + 1e-8)


class Generic(TaskHandler):
    task = Task.GENERIC
    default_budget = 0.10

    def metric(self, labeled: bool) -> Metric:
        return Metric.RELATIVE_ERROR

    def tensors(self, output: Any) -> list[torch.Tensor]:
        if self.output is not None:
            return [select_output(output, self.output)]
        found = [t for t in named_outputs(output).values() if t.is_floating_point()]
        if not found:
            raise OptionsError("The model returns no floating-point output to compare.",
                               hint="Compress a model with tensor outputs.", code="no_model_output")
        return found

    def flat(self, output: Any) -> torch.Tensor:
        return torch.cat([t.float().reshape(len(t), -1) for t in self.tensors(output)], dim=1)

    def check(self, output: Any, data: Dataset) -> str:
        tensors = self.tensors(output)
        if any(t.ndim == 0 or t.shape[0] != len(tensors[0]) for t in tensors):
            raise DataError("Every output compared must have the samples on its first axis.",
                            hint="Name one output with --output.", code="output_not_batched")
        if data.y is not None:
            width = sum(t[0].numel() for t in tensors)
            if not data.y.dtype.is_floating_point or data.y[0].numel() != width:
                raise DataError(f"Generic labels are target values, {width} floats per sample (the outputs "
                                f"compared); got {data.y.dtype} labels of shape {tuple(data.y.shape)}.",
                                hint="Store y as float targets shaped like the output, or drop y.",
                                code="labels_wrong_format")
        names = [n for n, t in named_outputs(output).items() if any(t is c for c in tensors)]
        return f"{len(tensors)} output(s) compared as values ({', '.join(names)})"

    def record(self, output: Any, batch: Inputs) -> torch.Tensor:
        return self.flat(output).detach()

    def quality(self, records: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor | None) -> float:
        target = reference if labels is None else labels.reshape(len(labels), -1).float()
        return float((records.double() - target.double()).norm() / (target.double().norm() + 1e-12))

    def agreement(self, records: torch.Tensor, reference: torch.Tensor) -> float:
        return max(0.0, 1.0 - self.quality(records, reference, None))

    def drift(self, records: torch.Tensor, reference: torch.Tensor) -> float:
        return self.quality(records, reference, None)

    def loss(self, student: Any, teacher: Any, batch: Inputs, labels: torch.Tensor | None, temperature: float,
             kd_weight: float) -> torch.Tensor:
        pairs = zip(self.tensors(student), self.tensors(teacher), strict=True)
        soft = torch.stack([normalised_mse(s, t) for s, t in pairs]).mean()
        if labels is None:
            return soft
        return normalised_mse(self.flat(student), labels.reshape(len(labels), -1)) + kd_weight * soft

    def taylor_loss(self, output: Any, batch: Inputs, labels: torch.Tensor | None) -> torch.Tensor:
        return self.flat(output).pow(2).sum()

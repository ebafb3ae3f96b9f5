"""Classification: N×classes logits; top-1 against labels, or agreement with the original's predictions."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from core.data import Dataset
from core.errors import DataError
from core.graph.outputs import named_outputs, select_output
from core.inputs import Inputs
from core.measure.accuracy import kl_from, soft_agreement
from core.tasks.base import TaskHandler
from core.tasks.kinds import Metric, Task


def distillation_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, dim: int = 1) -> torch.Tensor:
    """KL(teacher ‖ student) of the distributions over `dim` at `temperature`, scaled by T² (Hinton et al.),
    averaged over every other position."""
    log_s = nn.functional.log_softmax(student.float() / temperature, dim=dim)
    log_t = nn.functional.log_softmax(teacher.float() / temperature, dim=dim)
    per_position = (log_t.exp() * (log_t - log_s)).sum(dim)
    return per_position.mean() * temperature**2


class Classification(TaskHandler):
    task = Task.CLASSIFICATION
    default_budget = 0.01

    def metric(self, labeled: bool) -> Metric:
        return Metric.TOP1 if labeled else Metric.TOP1_AGREEMENT

    def logits(self, output: Any) -> torch.Tensor:
        return select_output(output, self.output)

    def check(self, output: Any, data: Dataset) -> str:
        out = self.logits(output)
        if out.ndim != 2:
            shapes = ", ".join(f"{name} {tuple(tensor.shape)}" for name, tensor in named_outputs(output).items())
            raise DataError(
                f"The model's {'output ' + repr(self.output) if self.output else 'first output'} has shape "
                f"{tuple(out.shape)}; a classifier output N×classes is needed (the model's outputs: {shapes}).",
                hint="Name the output that holds the class logits with --output (config output), choose the task the "
                     "model does with --task (config task: embedding, detection, segmentation, causal-lm or generic), "
                     "or leave the task at auto.",
                code="output_not_logits",
            )
        classes = int(out.shape[1])
        if data.y is not None:
            if data.y.ndim != 1 or data.y.dtype.is_floating_point:
                raise DataError(f"Classification labels are one integer class id per sample; got {data.y.dtype} "
                                f"labels of shape {tuple(data.y.shape)}.",
                                hint="Store y as int64 of shape (N,), or choose the task the labels are for.",
                                code="labels_wrong_format")
            low, high = int(data.y.min()), int(data.y.max())
            if high >= classes or low < 0:
                found = f"Labels go up to {high}" if high >= classes else f"Labels go down to {low}"
                raise DataError(f"{found} but the model has {classes} classes.",
                                hint=f"Use class ids 0..{classes - 1}, or drop y to compress without labels.",
                                code="labels_out_of_range")
        return f"{classes} class logits"

    def num_classes(self, output: Any) -> int | None:
        return int(self.logits(output).shape[1])

    def record(self, output: Any, batch: Inputs) -> torch.Tensor:
        return self.logits(output).detach().float()

    def quality(self, records: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor | None) -> float:
        target = labels if labels is not None else reference.argmax(1)
        return float((records.argmax(1) == target).float().mean())

    def agreement(self, records: torch.Tensor, reference: torch.Tensor) -> float:
        return soft_agreement(records, reference)

    def drift(self, records: torch.Tensor, reference: torch.Tensor) -> float:
        return kl_from(reference, records)

    def loss(self, student: Any, teacher: Any, batch: Inputs, labels: torch.Tensor | None, temperature: float,
             kd_weight: float) -> torch.Tensor:
        s_logits, t_logits = self.logits(student), self.logits(teacher)
        soft = distillation_kl(s_logits, t_logits, temperature)
        if labels is None:
            return soft
        return nn.functional.cross_entropy(s_logits.float(), labels) + kd_weight * soft

    def taylor_loss(self, output: Any, batch: Inputs, labels: torch.Tensor | None) -> torch.Tensor:
        logits = self.logits(output)
        target = labels if labels is not None else logits.argmax(1).detach()
        return nn.functional.cross_entropy(logits, target, reduction="sum")

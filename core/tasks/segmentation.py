"""Semantic segmentation: a per-pixel map N×classes×H×W (or N×1×H×W / N×H×W for one foreground class,
as logits or probabilities); mIoU against label masks, or against the original's argmax/thresholded map."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from core.data import Dataset
from core.errors import DataError
from core.graph.outputs import named_outputs, select_output
from core.inputs import Inputs
from core.tasks.base import TaskHandler
from core.tasks.classification import distillation_kl
from core.tasks.generic import normalised_mse
from core.tasks.kinds import Metric, Task
from core.tasks.metrics import confusion, mean_iou

# Label pixels with this value are not scored (PASCAL VOC's and Cityscapes' "void").
IGNORE = 255
# Drift and agreement compare the maps' class probabilities pooled to at most this side: the held-out split's
# records stay small, and a one-pixel shift of a boundary does not count as drift.
POOLED_SIDE = 32


class Segmentation(TaskHandler):
    task = Task.SEGMENTATION
    default_budget = 0.02
    eval_batch_size = 16

    def __init__(self, output: str | None = None) -> None:
        super().__init__(output)
        # set by check(): a one-channel map holds probabilities (already squashed) rather than logits
        self.probabilities = False

    def may_augment(self, labeled: bool) -> bool:
        return not labeled

    def metric(self, labeled: bool) -> Metric:
        return Metric.MIOU if labeled else Metric.MIOU_AGREEMENT

    def map(self, output: Any) -> torch.Tensor:
        """The map as N×C×H×W (torchvision's segmenters return it as "out", next to an auxiliary head)."""
        if self.output is None and isinstance(output, Mapping) and isinstance(output.get("out"), torch.Tensor):
            out = output["out"]
        else:
            out = select_output(output, self.output)
        return out[:, None] if out.ndim == 3 else out

    def probabilities_of(self, out: torch.Tensor) -> torch.Tensor:
        if out.shape[1] > 1:
            return out.float().softmax(1)
        p = out.float() if self.probabilities else out.float().sigmoid()
        return torch.cat([1 - p, p], dim=1)

    def classes(self, out: torch.Tensor) -> int:
        return max(int(out.shape[1]), 2)

    def check(self, output: Any, data: Dataset) -> str:
        out = self.map(output)
        if out.ndim != 4 or not out.is_floating_point():
            shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in named_outputs(output).items())
            raise DataError(f"A segmentation output is a per-pixel map N×classes×H×W; the model's outputs: {shapes}.",
                            hint="Name the map output with --output, or choose another task.",
                            code="output_not_map")
        self.probabilities = out.shape[1] == 1 and bool(out.min() >= 0) and bool(out.max() <= 1)
        if data.y is not None:
            y = data.y
            if y.ndim != 3 or y.dtype.is_floating_point or tuple(y.shape[1:]) != tuple(out.shape[2:]):
                raise DataError(f"Segmentation labels are integer masks of the map's size, N×{out.shape[2]}×"
                                f"{out.shape[3]}; got {y.dtype} labels of shape {tuple(y.shape)}.",
                                hint=f"Store y as integer class ids per pixel ({IGNORE} = not scored), or drop y.",
                                code="labels_wrong_format")
            scored = y[y != IGNORE]
            if len(scored) and (int(scored.min()) < 0 or int(scored.max()) >= self.classes(out)):
                raise DataError(f"Mask values go up to {int(scored.max())} but the map has {self.classes(out)} "
                                f"classes.", hint=f"Use class ids 0..{self.classes(out) - 1} and {IGNORE} for void.",
                                code="labels_out_of_range")
        kind = "probabilities" if self.probabilities else "logits"
        return f"{self.classes(out)}-class maps of {out.shape[2]}×{out.shape[3]} pixels ({kind})"

    def num_classes(self, output: Any) -> int | None:
        return self.classes(self.map(output))

    def record(self, output: Any, batch: Inputs) -> dict[str, torch.Tensor]:
        probabilities = self.probabilities_of(self.map(output).detach())
        side = (min(POOLED_SIDE, probabilities.shape[2]), min(POOLED_SIDE, probabilities.shape[3]))
        pooled = nn.functional.adaptive_avg_pool2d(probabilities, side)
        return {"classes": probabilities.argmax(1).to(torch.int16), "pooled": pooled.half()}

    def merge(self, records: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {key: torch.cat([r[key] for r in records]) for key in records[0]}

    def quality(self, records: dict[str, torch.Tensor], reference: dict[str, torch.Tensor],
                labels: torch.Tensor | None) -> float:
        truth = labels if labels is not None else reference["classes"]
        classes = int(reference["pooled"].shape[1])
        return mean_iou(confusion(records["classes"], truth, classes, IGNORE))

    def agreement(self, records: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
        """The probability mass the two maps share, per pooled pixel, on average."""
        return float(torch.minimum(records["pooled"].float(), reference["pooled"].float()).sum(1).mean())

    def drift(self, records: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
        p, q = reference["pooled"].double().clamp(min=1e-6), records["pooled"].double().clamp(min=1e-6)
        return float((p * (p.log() - q.log())).sum(1).mean())

    def loss(self, student: Any, teacher: Any, batch: Inputs, labels: torch.Tensor | None, temperature: float,
             kd_weight: float) -> torch.Tensor:
        s, t = self.map(student), self.map(teacher)
        if s.shape[1] > 1:
            soft = distillation_kl(s, t, temperature)
            own = None if labels is None else nn.functional.cross_entropy(s.float(), labels.long(),
                                                                            ignore_index=IGNORE)
        else:
            soft = normalised_mse(s, t)
            p = s.float().clamp(1e-6, 1 - 1e-6) if self.probabilities else s.float().sigmoid()
            scored = None if labels is None else labels != IGNORE
            own = None if labels is None or scored is None else nn.functional.binary_cross_entropy(
                p[:, 0][scored], labels[scored].float())
        return soft if own is None else own + kd_weight * soft

    def taylor_loss(self, output: Any, batch: Inputs, labels: torch.Tensor | None) -> torch.Tensor:
        s = self.map(output)
        target = labels if labels is not None else self.probabilities_of(s).argmax(1).detach()
        log_p = self.probabilities_of(s).clamp(min=1e-8).log()
        return nn.functional.nll_loss(log_p, target.long(), ignore_index=IGNORE, reduction="sum")

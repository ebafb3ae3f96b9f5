"""Object detection: per-image boxes, scores and labels (torchvision's detectors, or a model whose outputs
are named boxes/scores/labels); mAP@0.5 against labelled boxes, or against the original's detections.

Without labels, the original's detections scoring at least REFERENCE_SCORE are the ground truth; when none
of the held-out split's does (an untrained model), each image's REFERENCE_TOP best are. Recovery distils the
dense head outputs (torchvision's RPN head, or the single-stage head of SSD/RetinaNet/FCOS) with a
normalised MSE, since post-NMS boxes carry no gradient worth matching; with labels, a torchvision detector
also adds its own training losses. An exported YOLO head decoded by a chosen DetectionDecoder distils its
raw output the same way. A model whose outputs cannot be decoded into boxes (a raw head, no decoder chosen)
is compared as dense outputs (`DenseDetection`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from core.data import Dataset
from core.errors import DataError
from core.graph.detectors import TensorDetector
from core.graph.outputs import named_outputs, select_output
from core.inputs import Inputs
from core.tasks.base import TaskHandler
from core.tasks.generic import Generic, normalised_mse
from core.tasks.kinds import DetectionDecoder, Metric, Task
from core.tasks.metrics import mean_average_precision
from core.tasks.yolo import decode_yolo

REFERENCE_SCORE = 0.5
REFERENCE_TOP = 10
# Dense heads of torchvision's detectors, by attribute path.
DENSE_HEADS = ("rpn.head", "head")
_KEYS = ("boxes", "scores", "labels")

Detections = list[dict[str, torch.Tensor]]


def decode(output: Any) -> Detections | None:
    """Per-image detections from a torchvision-style list of dicts, or from outputs named boxes/scores/labels
    (one image's, or batched with an image axis, where an output named num_detections says how many rows of
    each image are real, as core.graph.detectors pads them); None when the outputs are not detections."""
    if isinstance(output, (list, tuple)) and output and all(
            isinstance(o, Mapping) and all(k in o for k in _KEYS) for o in output):
        return [{k: o[k] for k in _KEYS} for o in output]
    named = named_outputs(output)
    found = {k: next((t for n, t in named.items() if n.rsplit(".", 1)[-1] == k), None) for k in _KEYS}
    boxes, scores, labels = found["boxes"], found["scores"], found["labels"]
    if boxes is None or scores is None or labels is None:
        return None
    if boxes.ndim == 2:
        return [{"boxes": boxes, "scores": scores, "labels": labels}]
    counts = next((t for n, t in named.items() if n.rsplit(".", 1)[-1] == "num_detections"), None)
    rows = [len(b) for b in boxes] if counts is None else [int(n) for n in counts]
    return [{"boxes": b[:n], "scores": s[:n], "labels": c[:n]} for b, s, c, n in zip(boxes, scores, labels, rows)]


def dense_heads(model: nn.Module) -> list[nn.Module]:
    modules = dict((model.detector if isinstance(model, TensorDetector) else model).named_modules())
    return [modules[name] for name in DENSE_HEADS if name in modules]


def truths_from_labels(labels: torch.Tensor) -> Detections:
    """Labelled boxes from N×M×5 rows (x1, y1, x2, y2, class), class -1 for padding."""
    return [{"boxes": rows[rows[:, 4] >= 0, :4], "labels": rows[rows[:, 4] >= 0, 4].long()} for rows in labels]


def truths_from_reference(reference: Detections) -> Detections:
    confident = any(bool((d["scores"] >= REFERENCE_SCORE).any()) for d in reference)
    out = []
    for d in reference:
        keep = d["scores"] >= REFERENCE_SCORE if confident else d["scores"].argsort(descending=True)[:REFERENCE_TOP]
        out.append({"boxes": d["boxes"][keep], "labels": d["labels"][keep]})
    return out


class _Tap:
    """The outputs of a model's dense heads during one forward pass."""

    def __init__(self, heads: list[nn.Module]) -> None:
        self.values: list[torch.Tensor] = []
        self.handles = [h.register_forward_hook(lambda _m, _i, out: self.values.extend(_tensors(out)))
                        for h in heads]

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


def _tensors(value: Any) -> list[torch.Tensor]:
    return [t for t in named_outputs(value).values() if t.is_floating_point()]


class DenseDetection(Generic):
    """A detector whose outputs are not boxes (a raw head, and no decoder chosen): its outputs are held to a
    relative error, as the generic task holds any tensors."""

    task = Task.DETECTION

    def check(self, output: Any, data: Dataset) -> str:
        if all(t.ndim < 3 for t in self.tensors(output)):
            shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in named_outputs(output).items())
            raise DataError(f"The model's outputs are not detections: no boxes, scores and labels, and no raw head "
                            f"of N×anchors×values ({shapes}).",
                            hint="Choose the task the model does, or export the detector with its boxes.",
                            code="output_not_detections")
        return "raw head outputs (no boxes to decode; " + super().check(output, data) + ")"


class Detection(TaskHandler):
    task = Task.DETECTION
    default_budget = 0.03
    smooth_drift = False
    train_mode = False
    eval_batch_size = 16

    def __init__(self, output: str | None = None, decoder: DetectionDecoder = DetectionDecoder.AUTO) -> None:
        super().__init__(output)
        self.decoder = decoder

    def may_augment(self, labeled: bool) -> bool:
        return not labeled

    def metric(self, labeled: bool) -> Metric:
        return Metric.MAP50 if labeled else Metric.MAP50_AGREEMENT

    def detections(self, output: Any) -> Detections:
        if self.decoder is not DetectionDecoder.AUTO:
            try:
                return decode_yolo(select_output(output, self.output), self.decoder)
            except ValueError as exc:
                raise DataError(f"The {self.decoder} decoder cannot read the model's output: {exc}",
                                hint="Choose the decoder of the model's head layout, or auto.",
                                code="output_not_detections") from exc
        found = decode(output)
        if found is None:
            raise DataError("The model's outputs are not detections (boxes, scores, labels per image).",
                            hint="Choose a detection decoder for a raw YOLO head, or the task generic to compare raw "
                                 "outputs.", code="output_not_detections")
        return found

    def check(self, output: Any, data: Dataset) -> str:
        self.detections(output)
        if data.y is not None:
            y = data.y
            if y.ndim != 3 or y.shape[2] != 5 or not y.dtype.is_floating_point:
                raise DataError(f"Detection labels are N×M×5 floats, a row per box (x1, y1, x2, y2, class) padded "
                                f"with class -1; got {y.dtype} labels of shape {tuple(y.shape)}.",
                                hint="Store y in that layout, or drop y to compare with the original's detections.",
                                code="labels_wrong_format")
        return "boxes, scores and labels per image"

    def record(self, output: Any, batch: Inputs) -> Detections:
        return [{k: v.detach() for k, v in d.items()} for d in self.detections(output)]

    def merge(self, records: list[Detections]) -> Detections:
        return [d for batch in records for d in batch]

    def quality(self, records: Detections, reference: Detections, labels: torch.Tensor | None) -> float:
        truths = truths_from_labels(labels) if labels is not None else truths_from_reference(reference)
        return mean_average_precision(records, truths)

    def agreement(self, records: Detections, reference: Detections) -> float:
        return self.quality(records, reference, None)

    def drift(self, records: Detections, reference: Detections) -> float:
        return 1.0 - self.agreement(records, reference)

    def loss(self, student: Any, teacher: Any, batch: Inputs, labels: torch.Tensor | None, temperature: float,
             kd_weight: float) -> torch.Tensor:
        """`student` and `teacher` are the dense head outputs recovery_loss tapped, in call order."""
        pairs = [(s, t) for s, t in zip(student, teacher) if s.shape == t.shape]
        if not pairs:
            raise DataError("No dense detection head was found to distil (torchvision's rpn.head or head).",
                            hint="Choose the task generic to distil the raw outputs.", code="no_dense_head")
        return torch.stack([normalised_mse(s, t) for s, t in pairs]).mean()

    def recovery_loss(self, student: nn.Module, teacher: nn.Module, batch: Inputs, labels: torch.Tensor | None,
                      temperature: float, kd_weight: float) -> torch.Tensor:
        if self.decoder is not DetectionDecoder.AUTO:  # the raw head is the dense output
            with torch.no_grad():
                target = select_output(batch.call(teacher), self.output)
            return normalised_mse(select_output(batch.call(student), self.output), target)
        s_tap, t_tap = _Tap(dense_heads(student)), _Tap(dense_heads(teacher))
        try:
            with torch.no_grad():
                batch.call(teacher)
            batch.call(student)
        finally:
            s_tap.close()
            t_tap.close()
        soft = self.loss(s_tap.values, t_tap.values, batch, labels, temperature, kd_weight)
        if labels is None:
            return soft
        return self._own_loss(student, batch, labels) + kd_weight * soft

    def _own_loss(self, student: nn.Module, batch: Inputs, labels: torch.Tensor) -> torch.Tensor:
        """A torchvision detector's own training losses on the labelled boxes (in training mode, where it
        computes them)."""
        images = batch.first
        targets = [{"boxes": t["boxes"].to(images.device), "labels": t["labels"].to(images.device)}
                   for t in truths_from_labels(labels)]
        student.train()
        try:
            losses = student(list(images), targets)
        finally:
            student.eval()
        if not isinstance(losses, Mapping):
            raise DataError("Labelled recovery needs a detector that returns its losses in training mode "
                            "(torchvision's).", hint="Drop y to recover by distillation.", code="labels_unsupported")
        return sum(losses.values(), torch.zeros((), device=images.device))

    def taylor_loss(self, output: Any, batch: Inputs, labels: torch.Tensor | None) -> torch.Tensor:
        return sum((d["scores"].sum() for d in self.detections(output)), torch.zeros(()))

"""A run's task settled against the model: one small batch of the data through the model, the task chosen
(or inferred) from what comes out, and the outputs and labels checked against it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from core.data import Dataset
from core.errors import DataError
from core.inputs import Inputs
from core.tasks.base import TaskHandler
from core.tasks.detection import DenseDetection
from core.tasks.kinds import DetectionDecoder, Task
from core.tasks.registry import handler_for, infer_task


@dataclass(frozen=True)
class SettledTask:
    handler: TaskHandler
    inferred: bool
    reason: str  # why auto chose it ("" when the caller did)
    measures: str  # what the metric is taken on ("10 class logits")

    @property
    def note(self) -> str:
        how = f"inferred: {self.reason}" if self.inferred else "as chosen"
        metric = self.handler.metric
        dense = " (no boxes to decode: the raw outputs are compared)" if isinstance(self.handler, DenseDetection) \
            else ""
        return (f"Task: {self.handler.task} ({how}){dense}; quality is {metric(True).label} with labels, "
                f"{metric(False).label} without, on {self.measures}.")


@torch.no_grad()
def settle_task(model: nn.Module, data: Dataset, device: torch.device, task: Task, output: str | None,
                decoder: DetectionDecoder = DetectionDecoder.AUTO) -> SettledTask:
    """The handler of `task` (inferred when auto) for `model` (eval mode, on `device`) and `data` (bound to
    it); raises DataError when the model rejects the data or the outputs or labels do not fit the task."""
    sample = data.inputs[: min(2, len(data))].to(device)
    handles = [m.register_forward_pre_hook(_integer_ids(sample)) for m in model.modules()
               if isinstance(m, nn.Embedding)]
    try:
        result = sample.call(model)
    except DataError:
        raise
    except Exception as exc:  # the model decides what it accepts; any failure is the data's shape
        signature = sample.signature
        shapes = str(signature[0].shape) if len(signature) == 1 else \
            ", ".join(f"{s.name} {s.shape}" for s in signature)
        raise DataError(
            f"The model rejects inputs of shape {shapes} (per sample): "
            f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "),
            hint="Store the inputs with the shape the model was trained on, samples on the first axis.",
            code="data_shape_mismatch",
        ) from exc
    finally:
        for handle in handles:
            handle.remove()
    inferred = task is Task.AUTO
    reason = ""
    if inferred:
        task, reason = infer_task(model, result, sample, output)
    handler = handler_for(task, output, result, decoder)
    return SettledTask(handler, inferred, reason, handler.check(result, data))


def _integer_ids(sample: Inputs) -> Callable[[nn.Module, tuple], None]:
    """A pre-hook for embeddings: float values looked up as ids are token ids stored as floats."""

    def hook(_m: nn.Module, args: tuple) -> None:
        if args and isinstance(args[0], torch.Tensor) and args[0].is_floating_point():
            floats = [s.name for s in sample.signature if s.dtype.is_floating_point]
            raise DataError(
                f"The model looks up {', '.join(floats) or 'an input'} in an embedding, but the data holds "
                f"floats ({', '.join(s.dtype_name for s in sample.signature if s.name in floats)}).",
                hint="Store token ids as integers (int64).", code="float_token_ids")

    return hook

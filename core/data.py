"""Calibration data as the method sees it: a dataset, its check against the model, the held-out
split, and batches."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from core.errors import DataError
from core.graph.outputs import named_outputs, select_output


@dataclass
class Dataset:
    """Inputs `x` (float32, N×…) and optional integer labels `y` (N)."""

    x: torch.Tensor
    y: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def labeled(self) -> bool:
        return self.y is not None

    def subset(self, index: torch.Tensor) -> Dataset:
        return Dataset(self.x[index], None if self.y is None else self.y[index])


def split(data: Dataset, eval_fraction: float, seed: int, min_eval: int = 1) -> tuple[Dataset, Dataset]:
    """Deterministic split into (recovery, held-out evaluation)."""
    n = len(data)
    n_eval = min(max(int(round(n * eval_fraction)), min_eval), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return data.subset(order[n_eval:]), data.subset(order[:n_eval])


def batches(x: torch.Tensor, batch_size: int) -> Iterator[torch.Tensor]:
    """`x` in consecutive slices of `batch_size` samples (the last one shorter)."""
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size]


@torch.no_grad()
def check_against_model(model: nn.Module, data: Dataset, device: torch.device, output: str | None) -> int:
    """Run one small batch; return the number of classes the model's `output` (see
    core.graph.outputs.select_output) holds."""
    sample = data.x[: min(2, len(data))].to(device)
    try:
        result = model(sample)
    except Exception as exc:  # the model decides what it accepts; any failure is the data's shape
        raise DataError(
            f"The model rejects inputs of shape {tuple(data.x.shape[1:])} (per sample): "
            f"{exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": "),
            hint="Store x with the shape the model was trained on, samples on the first axis.",
            code="data_shape_mismatch",
        ) from exc
    out = select_output(result, output)
    if out.ndim != 2:
        shapes = ", ".join(f"{name} {tuple(tensor.shape)}" for name, tensor in named_outputs(result).items())
        raise DataError(
            f"The model's {'output ' + repr(output) if output else 'first output'} has shape {tuple(out.shape)}; "
            f"a classifier output N×classes is needed (the model's outputs: {shapes}).",
            hint="Name the output that holds the class logits with --output (config output), or compress a "
                 "classification model.",
            code="output_not_logits",
        )
    num_classes = int(out.shape[1])
    if data.y is not None and int(data.y.max()) >= num_classes:
        raise DataError(
            f"Labels go up to {int(data.y.max())} but the model has {num_classes} classes.",
            hint=f"Use class ids 0..{num_classes - 1}, or drop y to compress without labels.",
            code="labels_out_of_range",
        )
    return num_classes

"""Calibration data as the method sees it: a dataset, the held-out split, and batches."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from core.inputs import Inputs

# A split at most this large is copied to the device once and sliced there; a larger one goes batch by
# batch from pinned memory, so that a 50k-image upload does not take the GPU's memory.
RESIDENT_BYTES = 1 << 30


@dataclass
class Dataset:
    """The model's inputs (N samples each) and optional labels `y`, samples on dim 0, in the layout the
    run's task reads (core.tasks: class ids, masks, boxes, group ids)."""

    inputs: Inputs
    y: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    @property
    def labeled(self) -> bool:
        return self.y is not None

    def subset(self, index: torch.Tensor) -> Dataset:
        return Dataset(self.inputs[index], None if self.y is None else self.y[index])

    def bound(self, model: nn.Module, aliases: Mapping[str, str] | None = None) -> Dataset:
        """The same data with its inputs named as `model.forward` takes them (Inputs.bind)."""
        return Dataset(self.inputs.bind(model, aliases), self.y)


def split(data: Dataset, eval_fraction: float, seed: int, min_eval: int = 1) -> tuple[Dataset, Dataset]:
    """Deterministic split into (recovery, held-out evaluation)."""
    n = len(data)
    n_eval = min(max(int(round(n * eval_fraction)), min_eval), n - 1)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return data.subset(order[n_eval:]), data.subset(order[:n_eval])


def batches(inputs: Inputs, batch_size: int) -> Iterator[Inputs]:
    """`inputs` in consecutive slices of `batch_size` samples (the last one shorter)."""
    for i in range(0, len(inputs), batch_size):
        yield inputs[i : i + batch_size]


def nbytes(inputs: Inputs) -> int:
    """The bytes `inputs` hold."""
    return sum(t.numel() * t.element_size() for t in inputs.tensors.values())


def to_device(batch: Inputs, device: torch.device) -> Inputs:
    """`batch` on `device`; to CUDA from pinned memory without blocking the host (the pinned copy belongs to
    this transfer alone, and the caching host allocator keeps it until the copy is done)."""
    if device.type != "cuda" or batch.first.device.type != "cpu":
        return batch.to(device)
    return Inputs({name: t.pin_memory().to(device, non_blocking=True) for name, t in batch.tensors.items()},
                  batch.positional)


def device_batches(inputs: Inputs, device: torch.device, batch_size: int) -> Iterator[Inputs]:
    """`inputs` in consecutive batches on `device`: sliced there after one copy when they fit RESIDENT_BYTES,
    else copied batch by batch (`to_device`)."""
    if nbytes(inputs) <= RESIDENT_BYTES:
        inputs = inputs.to(device)
    for i in range(0, len(inputs), batch_size):
        yield to_device(inputs[i : i + batch_size], device)


def resident(data: Dataset) -> bool:
    """Whether `data` is small enough to live on the device for a whole recovery."""
    labels = 0 if data.y is None else data.y.numel() * data.y.element_size()
    return nbytes(data.inputs) + labels <= RESIDENT_BYTES

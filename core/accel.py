"""How the passes over data use an accelerator: the arithmetic of recovery (bf16 autocast), the memory
layout of convolution nets (channels_last), and data that stays on the device instead of being copied
there batch by batch."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from core.data import Dataset
from core.inputs import Inputs
from core.options import Precision

# A split at most this large is copied to the device once and sliced there; a larger one goes batch by
# batch from pinned memory, so that a 50k-image upload does not take the GPU's memory.
RESIDENT_BYTES = 1 << 30


def resolve_precision(precision: Precision, device: torch.device) -> Precision:
    """What `precision` is on `device`: auto is bf16 on a CUDA device with bf16 arithmetic, fp32 elsewhere."""
    if precision != Precision.AUTO:
        return precision
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return Precision.BF16 if bf16 else Precision.FP32


def autocast(precision: Precision, device: torch.device) -> contextlib.AbstractContextManager:
    """The autocast context of `precision` on `device` (a no-op for float32)."""
    if resolve_precision(precision, device) == Precision.FP32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def uses_channels_last(model: nn.Module, sample: Inputs, device: torch.device) -> bool:
    """Whether `model`'s passes should run in channels_last: on CUDA only (cuDNN's NHWC kernels use the tensor
    cores; on a CPU the conversions cost more than they bring), for image inputs (a 4-D float tensor), in a
    convolution net (most weighted layers 2-D convolutions: a ViT's one patch convolution does not count)."""
    if device.type != "cuda":
        return False
    if not any(t.dim() == 4 and t.dtype.is_floating_point for t in sample.tensors.values()):
        return False
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    return convs > linears


def channels_last(batch: Inputs) -> Inputs:
    """`batch` with its 4-D float tensors in channels_last."""
    return Inputs({name: t.contiguous(memory_format=torch.channels_last)
                   if t.dim() == 4 and t.dtype.is_floating_point else t
                   for name, t in batch.tensors.items()}, batch.positional)


@contextlib.contextmanager
def memory_layout(models: Sequence[nn.Module], sample: Inputs, device: torch.device) -> Iterator[bool]:
    """Run a block with `models` in channels_last when `uses_channels_last` says so (it yields whether), and
    restore their layout after, so that surgery and export see the weights as they always are."""
    if not uses_channels_last(models[0], sample, device):
        yield False
        return
    for model in models:
        model.to(memory_format=torch.channels_last)
    try:
        yield True
    finally:
        for model in models:
            model.to(memory_format=torch.contiguous_format)


def nbytes(inputs: Inputs) -> int:
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


def resident(data: Dataset, device: torch.device) -> bool:
    """Whether `data` is small enough to live on `device` for a whole recovery."""
    labels = 0 if data.y is None else data.y.numel() * data.y.element_size()
    return nbytes(data.inputs) + labels <= RESIDENT_BYTES

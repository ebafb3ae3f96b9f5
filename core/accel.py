"""How the passes over data use an accelerator: the arithmetic of recovery (bf16 autocast) and the memory
layout of convolution nets (channels_last). Data on the device: core.data."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from core.inputs import Inputs
from core.options import Precision


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

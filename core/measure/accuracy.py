"""How well a model still does: top-1 on the held-out split, and drift from the original's outputs."""

from __future__ import annotations

import torch
from torch import nn

from core.data import Dataset, batches
from core.graph.outputs import select_output
from core.inputs import Inputs


@torch.no_grad()
def all_logits(model: nn.Module, x: Inputs, device: torch.device, output: str | None,
               batch_size: int = 256) -> torch.Tensor:
    """The logits `model` gives `x` (its `output`, see core.graph.outputs.select_output), on the CPU."""
    model.eval()
    return torch.cat([select_output(batch.to(device).call(model), output).float().cpu()
                      for batch in batches(x, batch_size)])


def predict(model: nn.Module, x: Inputs, device: torch.device, output: str | None) -> torch.Tensor:
    return all_logits(model, x, device, output).argmax(1)


def drift(model: nn.Module, x: Inputs, device: torch.device, reference: torch.Tensor,
          output: str | None) -> float:
    """Mean KL divergence of `model`'s outputs on `x` from the `reference` logits (the original
    model's): how far a pruned candidate has moved from the function it should keep. Unlike top-1
    or the loss against labels, it still separates two candidates on samples the original has
    memorised, where both are right and confident."""
    return kl_from(reference, all_logits(model, x, device, output))


def kl_from(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL divergence of the distributions `logits` give from those `reference` gives (in float64:
    a cut that barely moves the logits must still measure above zero)."""
    log_p = torch.log_softmax(reference.double(), dim=1)
    log_q = torch.log_softmax(logits.double(), dim=1)
    return float((log_p.exp() * (log_p - log_q)).sum(1).mean())


def soft_agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """The mean probability `logits` give the class the `reference` logits predict: top-1 agreement made
    smooth. One flipped sample moves top-1 agreement by 1/N; this moves by the probability mass that
    actually shifted, so it resolves drops finer than one sample of a small held-out split."""
    probabilities = torch.softmax(logits.double(), dim=1)
    return float(probabilities.gather(1, reference.argmax(1, keepdim=True)).mean())


def top1(model: nn.Module, data: Dataset, device: torch.device, reference: torch.Tensor | None,
         output: str | None) -> float:
    """Top-1 against the labels, or agreement with `reference` predictions when unlabeled."""
    target = data.y if data.y is not None else reference
    if target is None:
        raise ValueError("Unlabeled data needs the original model's predictions as reference.")
    return float((predict(model, data.inputs, device, output) == target).float().mean())

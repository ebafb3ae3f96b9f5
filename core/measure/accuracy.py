"""How close two classifiers' outputs are: KL divergence and soft agreement of their logits."""

from __future__ import annotations

import torch


def kl_from(reference: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL divergence of the distributions `logits` give from those `reference` gives (in float64:
    a cut that barely moves the logits must still measure above zero). Unlike top-1 or the loss against
    labels, it still separates two candidates on samples the original has memorised, where both are
    right and confident."""
    log_p = torch.log_softmax(reference.double(), dim=1)
    log_q = torch.log_softmax(logits.double(), dim=1)
    return float((log_p.exp() * (log_p - log_q)).sum(1).mean())


def soft_agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """The mean probability `logits` give the class the `reference` logits predict: top-1 agreement made
    smooth. One flipped sample moves top-1 agreement by 1/N; this moves by the probability mass that
    actually shifted, so it resolves drops finer than one sample of a small held-out split."""
    probabilities = torch.softmax(logits.double(), dim=1)
    return float(probabilities.gather(1, reference.argmax(1, keepdim=True)).mean())

"""Compensation: a Linear that loses input columns makes up for them from their calibration
statistics before they go (mean into the bias; with the covariance, a least-squares refit)."""

from __future__ import annotations

import torch
from torch import nn

from core.importance.statistics import InputStats

# Ridge of the least-squares fit, relative to the kept inputs' mean variance: calibration sets are a
# few thousand tokens against up to a few thousand inputs, so the plain normal equations overfit.
RIDGE = 1e-2


@torch.no_grad()
def compensate_linear(consumer: nn.Linear, columns: list[int], stats: InputStats) -> None:
    """Make up in `consumer` for the inputs `columns` before they are removed.

    With the mean only, their mean is folded into the bias, so the removal takes away only their
    variation around it. With the covariance, that variation is also predicted from the kept inputs
    (ridge least squares on the calibration statistics) and the prediction is folded into the kept
    columns' weights: the consumer's output then changes only by what the kept inputs cannot
    explain of the removed ones.
    """
    weight = consumer.weight
    removed = torch.tensor(sorted(columns))
    w_removed = weight[:, removed.to(weight.device)].double()
    mean = stats.mean.double()
    if stats.cov is None or len(removed) == weight.shape[1]:
        consumer.bias.add_((w_removed @ mean[removed].to(weight.device)).to(consumer.bias))
        return
    mask = torch.ones(weight.shape[1], dtype=torch.bool)
    mask[removed] = False
    kept = mask.nonzero().flatten()
    cov = stats.cov.double()
    cov_kk = cov[kept][:, kept]
    ridge = RIDGE * float(cov_kk.diagonal().mean()) + 1e-12
    cov_kk += ridge * torch.eye(len(kept), dtype=cov.dtype)
    # x_removed ≈ mean_removed + coef.T @ (x_kept − mean_kept)
    coef = torch.linalg.solve(cov_kk, cov[kept][:, removed]).to(weight.device)
    weight[:, kept.to(weight.device)] += (w_removed @ coef.T).to(weight)
    offset = mean[removed].to(weight.device) - coef.T @ mean[kept].to(weight.device)
    consumer.bias.add_((w_removed @ offset).to(consumer.bias))

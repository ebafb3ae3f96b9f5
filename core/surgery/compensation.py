"""Compensation: a layer that loses input channels makes up for them from their calibration
statistics before they go (mean into the bias; with the covariance, a least-squares refit).

A Linear reads one vector per row; a convolution reads one channel vector per position under
each of its kernel taps, so the same per-vector fit applies to every tap of its kernel."""

from __future__ import annotations

import torch
from torch import nn

from core.graph.layers import DenseLayer
from core.importance.statistics import InputStats

# Ridge of the least-squares fit, relative to the kept inputs' mean variance: calibration sets are a
# few thousand tokens against up to a few thousand inputs, so the plain normal equations overfit.
RIDGE = 1e-2


@torch.no_grad()
def compensate(consumer: DenseLayer, columns: list[int], stats: InputStats) -> None:
    """Make up in `consumer` (core.graph.layers.mixes_densely) for the input channels `columns` before
    they are removed.

    With the mean only, their mean is folded into the bias, so the removal takes away only their
    variation around it. With the covariance, that variation is also predicted from the kept inputs
    (ridge least squares on the calibration statistics) and the prediction is folded into the kept
    channels' weights, tap by tap in a convolution: the consumer's output then changes only by what
    the kept inputs cannot explain of the removed ones (and, in a padded convolution, at the border,
    where the padding's zeros are not predicted). A convolution without a bias (one a BatchNorm
    follows) is given one.
    """
    weight = consumer.weight
    taps = weight.reshape(weight.shape[0], weight.shape[1], -1)  # out × in × kernel positions
    if consumer.bias is None:
        consumer.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
    removed = torch.tensor(sorted(columns))
    w_removed = taps[:, removed.to(weight.device)].double()
    mean = stats.mean.double().to(weight.device)
    if stats.cov is None or len(removed) == weight.shape[1]:
        consumer.bias.add_(torch.einsum("ort,r->o", w_removed, mean[removed]).to(consumer.bias))
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
    refit = torch.einsum("ort,kr->okt", w_removed, coef)
    weight[:, kept.to(weight.device)] += refit.reshape(weight.shape[0], len(kept), *weight.shape[2:]).to(weight)
    offset = mean[removed] - coef.T @ mean[kept]
    consumer.bias.add_(torch.einsum("ort,r->o", w_removed, offset).to(consumer.bias))

"""Compensation: a layer that loses input channels makes up for them from their calibration
statistics before they go (mean into the bias; with the covariance, a least-squares refit).

A Linear reads one vector per row; a convolution reads one channel vector per position under
each of its kernel taps, so the same per-vector fit applies to every tap of its kernel."""

from __future__ import annotations

import torch
from torch import nn

from core.graph.layers import DenseLayer
from core.importance.statistics import InputStats

# Ridges of the least-squares fit, relative to the kept inputs' mean variance, that the fit chooses
# from by trying each on half of the calibration batches and measuring it on the other half. A few
# hundred images give a late convolution fewer input vectors than it has channels, where a small ridge
# fits the calibration set and nothing else; the largest ridges come close to the mean alone.
RIDGES: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)
# The ridge when the statistics have no halves to choose with (a calibration set of one batch).
RIDGE = 1e-2


@torch.no_grad()
def compensate(consumer: DenseLayer, columns: list[int], stats: InputStats) -> None:
    """Make up in `consumer` (core.graph.layers.mixes_densely) for the input channels `columns` before
    they are removed.

    With the mean only, their mean is folded into the bias, so the removal takes away only their
    variation around it. With the covariance, that variation is also predicted from the kept inputs
    (ridge least squares on the calibration statistics, the ridge chosen on held-out batches:
    `chosen_ridge`) and the prediction is folded into the kept channels' weights, tap by tap in a
    convolution: the consumer's output then changes only by what the kept inputs cannot explain of
    the removed ones (and, in a padded convolution, at the border, where the padding's zeros are not
    predicted). A convolution without a bias (one a BatchNorm follows) is given one.
    """
    weight = consumer.weight
    taps = weight.reshape(weight.shape[0], weight.shape[1], -1)  # out × in × kernel positions
    if consumer.bias is None:
        consumer.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
    removed = torch.tensor(sorted(columns))
    w_removed = taps[:, removed.to(weight.device)].double()
    if stats.cov is None or len(removed) == weight.shape[1]:
        mean = stats.mean.double().to(weight.device)
        consumer.bias.add_(torch.einsum("ort,r->o", w_removed, mean[removed]).to(consumer.bias))
        return
    mask = torch.ones(weight.shape[1], dtype=torch.bool)
    mask[removed] = False
    kept = mask.nonzero().flatten()
    coef, offset = _fit(stats, kept, removed, chosen_ridge(stats, kept, removed, w_removed.cpu()))
    refit = torch.einsum("ort,kr->okt", w_removed, coef.to(weight.device))
    weight[:, kept.to(weight.device)] += refit.reshape(weight.shape[0], len(kept), *weight.shape[2:]).to(weight)
    consumer.bias.add_(torch.einsum("ort,r->o", w_removed, offset.to(weight.device)).to(consumer.bias))


def _fit(stats: InputStats, kept: torch.Tensor, removed: torch.Tensor, ridge: float
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """coef, offset of x_removed ≈ offset + coef.T @ x_kept, ridge least squares on `stats` (float64)."""
    assert stats.cov is not None
    cov, mean = stats.cov.double(), stats.mean.double()
    cov_kk = cov[kept][:, kept]
    cov_kk += (ridge * float(cov_kk.diagonal().mean()) + 1e-12) * torch.eye(len(kept), dtype=cov.dtype)
    coef = torch.linalg.solve(cov_kk, cov[kept][:, removed])
    return coef, mean[removed] - coef.T @ mean[kept]


def _other_half(stats: InputStats) -> InputStats:
    """The statistics of the batches `stats.half` does not hold, from the sums of the whole and the half."""
    half = stats.half
    assert half is not None and stats.cov is not None and half.cov is not None
    n, n_half = stats.rows, half.rows
    mean, mean_half = stats.mean.double(), half.mean.double()
    second = n * (stats.cov.double() + torch.outer(mean, mean)) - n_half * (
        half.cov.double() + torch.outer(mean_half, mean_half))
    other_mean = (n * mean - n_half * mean_half) / (n - n_half)
    return InputStats(other_mean, second / (n - n_half) - torch.outer(other_mean, other_mean), rows=n - n_half)


def chosen_ridge(stats: InputStats, kept: torch.Tensor, removed: torch.Tensor, w_removed: torch.Tensor) -> float:
    """The ridge (of RIDGES) whose fit on half of the calibration batches changes the consumer's output
    least on the other half: the error of the prediction of the removed inputs, weighted by the
    consumer's weights on them (`w_removed`: out × removed × taps). RIDGE without halves."""
    if stats.half is None or stats.half.cov is None or not 0 < stats.half.rows < stats.rows:
        return RIDGE
    other = _other_half(stats)
    assert other.cov is not None
    weights = torch.einsum("ort,oqt->rq", w_removed, w_removed)  # removed × removed
    cov_kk, cov_kr = other.cov[kept][:, kept], other.cov[kept][:, removed]
    cov_rr = other.cov[removed][:, removed]

    def held_out_error(ridge: float) -> float:
        coef, offset = _fit(stats.half, kept, removed, ridge)  # type: ignore[arg-type]
        # E[e eᵀ] of e = x_removed − offset − coefᵀ x_kept over the other half
        residual = cov_rr - coef.T @ cov_kr - cov_kr.T @ coef + coef.T @ cov_kk @ coef
        bias = other.mean[removed] - offset - coef.T @ other.mean[kept]
        return float((weights * residual).sum() + bias @ weights @ bias)

    return min(RIDGES, key=held_out_error)

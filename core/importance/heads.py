"""Attention heads' scores (method §2): s_h of each head of a recognised attention module, and the
weight-norm and Taylor baselines for heads."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from core.graph.attention import AttentionSite
from core.importance.statistics import CalibrationPass, InputMoments, InputStats, token_rows
from core.inputs import Inputs


def head_divergence(model: nn.Module, sites: list[AttentionSite], calib: Inputs, device: torch.device,
                    batch_size: int, means_out: dict[str, InputStats] | None = None,
                    with_cov: bool = False) -> dict[str, torch.Tensor]:
    """s_h = (1/n)‖O_h‖_F · (‖W_Q^h‖_F + ‖W_K^h‖_F + ‖W_V^h‖_F), averaged over the calibration samples;
    O_h is head h's output before the output projection (its input, split by head). Under grouped-query
    attention h is a key-value group: O_h holds the outputs of its query heads, and W_Q^h their rows.

    With `means_out` (a dict to fill), O_h is taken minus its calibration mean; the statistics of the
    output projection's inputs (the mean, with `with_cov` the covariance too) are stored per site
    for `core.surgery.heads.remove_heads` to compensate with.
    """
    calibration = CalibrationPass(model)
    finish = attach_head_divergence(calibration, sites, means_out, with_cov)
    calibration.run(calib, device, batch_size)
    return finish()


def attach_head_divergence(calibration: CalibrationPass, sites: list[AttentionSite],
                           means_out: dict[str, InputStats] | None = None,
                           with_cov: bool = False) -> Callable[[], dict[str, torch.Tensor]]:
    """`head_divergence` as hooks of `calibration`; the returned function gives the scores (and fills
    `means_out`) once the pass ran."""
    model = calibration.model
    squares: dict[str, list[torch.Tensor]] = {}
    sums: dict[str, list[torch.Tensor]] = {}
    tokens: dict[str, int] = {}
    moments = {site.name: InputMoments(with_cov) for site in sites}
    for site in sites:
        heads = site.num_heads(model)

        def pre(_m: nn.Module, inputs: tuple, site: AttentionSite = site, heads: int = heads) -> None:
            x = inputs[0].detach().float()
            x = x.reshape(x.shape[0], -1, heads, site.unit_width)  # batch, tokens, heads, head size
            # kept on the device until all batches ran: a copy per batch would wait for the device each time
            squares.setdefault(site.name, []).append(x.pow(2).sum(dim=(1, 3)))
            if means_out is not None:
                sums.setdefault(site.name, []).append(x.sum(dim=1))  # batch, heads, head size
                moments[site.name].add(*token_rows(x.flatten(2), calibration.tokens["mask"]))
            tokens[site.name] = x.shape[1]

        calibration.forward_pre_hook(model.get_submodule(site.out), pre)

    @torch.no_grad()
    def finish() -> dict[str, torch.Tensor]:
        scores = {}
        for site in sites:
            if site.name not in squares:
                continue
            sq, n = torch.cat(squares[site.name]), tokens[site.name]
            if means_out is not None:
                s1 = torch.cat(sums[site.name])
                mean = s1.sum(0) / (len(s1) * n)
                sq = (sq - 2 * (mean * s1).sum(-1) + n * mean.pow(2).sum(-1)).clamp_min(0)
                means_out[site.name] = moments[site.name].stats()
            scores[site.name] = (sq.sqrt() / n).mean(0).cpu() * head_weight_norms(model, site)
        return scores

    return finish


def head_weight_norms(model: nn.Module, site: AttentionSite) -> torch.Tensor:
    """‖W_Q^h‖_F + ‖W_K^h‖_F + ‖W_V^h‖_F per head (also the magnitude baseline's score)."""
    heads = site.num_heads(model)
    total = torch.zeros(heads)
    for proj in site.projections(model):
        # a head's (or key-value group's) rows are contiguous in every projection
        total += proj.weight.detach().float().cpu().reshape(heads, -1).pow(2).sum(dim=1).sqrt()
    return total


def head_taylor(model: nn.Module, site: AttentionSite) -> torch.Tensor:
    """|Σ w·∂L/∂w| per head over q/k/v, from gradients already accumulated on the model."""
    heads = site.num_heads(model)
    total = torch.zeros(heads)
    for proj in site.projections(model):
        if proj.weight.grad is None:
            continue
        product = (proj.weight.detach() * proj.weight.grad).float().cpu().reshape(heads, -1)
        total += product.sum(1).abs()
    return total

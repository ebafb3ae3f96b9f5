"""Calibration statistics: the calibration batches run with hooks, restricted to real tokens, and
the mean and covariance of a Linear's inputs that scoring centres on and compensation refits with."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from core.data import batches
from core.inputs import Inputs


@dataclass(frozen=True)
class InputStats:
    """Calibration statistics of a consumer Linear's inputs: their mean and, for least-squares
    compensation, their covariance (None: compensate with the mean only)."""

    mean: torch.Tensor
    cov: torch.Tensor | None = None


class InputMoments:
    """Running sums of a layer's inputs (rows of a 2-D tensor) for `InputStats`."""

    def __init__(self, with_cov: bool) -> None:
        self.with_cov = with_cov
        self.rows = 0
        self.total: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows.double()
        total = rows.sum(0)
        self.total = total if self.total is None else self.total + total
        if self.with_cov:
            gram = rows.T @ rows
            self.gram = gram if self.gram is None else self.gram + gram
        self.rows += len(rows)

    def stats(self) -> InputStats:
        assert self.total is not None
        mean = self.total / self.rows
        # summed in float64, where E[x²] − E[x]² does not cancel away; kept in float32 (a ViT-B's
        # twelve 3072-wide MLPs would hold 900 MB of covariances in float64)
        cov = None if self.gram is None else self.gram / self.rows - torch.outer(mean, mean)
        return InputStats(mean.float().cpu(), None if cov is None else cov.float().cpu())


def real_tokens(model: nn.Module, batch: Inputs) -> torch.Tensor | None:
    """Which (sample, position) entries of a batch of token ids are not padding: those its attention
    mask keeps, or without a mask those that are not the padding token of a model that names one
    (core.intake.hf.TextClassifier); None for any other input."""
    mask = batch.tensors.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return mask != 0
    pad = getattr(model, "pad_token_id", None)
    ids = batch.first
    if pad is None or ids.dim() != 2 or ids.dtype.is_floating_point:
        return None
    return ids != pad


def run_calibration(model: nn.Module, calib: Inputs, device: torch.device, batch_size: int,
                    handles: list, tokens: dict[str, torch.Tensor | None]) -> None:
    """Run the calibration batches through `model` in eval mode for its hooks, with `tokens["mask"]`
    set to each batch's real tokens (`real_tokens`), then remove the hooks (`handles`)."""
    model.eval()
    try:
        for batch in batches(calib, batch_size):
            batch = batch.to(device)
            tokens["mask"] = real_tokens(model, batch)
            batch.call(model)
    finally:
        for handle in handles:
            handle.remove()


def token_rows(act: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The unit vectors of `act` (batch × positions × units) at real tokens only: a padding
    position's activations never reach the output, so they must not shape the statistics a
    consumer is refitted on (short review snippets padded to 64 tokens are mostly padding)."""
    if mask is not None and act.shape[:2] == mask.shape:
        return act[mask]
    return act.reshape(-1, act.shape[-1])


# Widest input whose covariance `linear_input_stats` keeps (a VGG classifier reads 25088 features:
# their float64 Gram matrix alone would take 5 GB); wider readers get the mean only.
MAX_FIT_INPUTS = 4096


@torch.no_grad()
def linear_input_stats(model: nn.Module, calib: Inputs, device: torch.device, batch_size: int,
                       with_cov: bool, known: dict[nn.Linear, InputStats] | None = None
                       ) -> dict[nn.Linear, InputStats]:
    """Statistics of every Linear's inputs on the calibration data (real tokens only): what a Linear
    that loses input columns as a reader, not as the removed units' consumer (every reader of a
    residual-stream channel), makes up for them with. Linears that read the same tensor (an
    attention's query, key and value) share one set of statistics. Those in `known` (consumers the
    unit scoring already gathered them for) are returned as they are, not gathered again."""
    known = known or {}
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m not in known]
    moments: dict[int, InputMoments] = {}
    source: dict[nn.Linear, int] = {}  # reader -> the moments of the tensor it read
    # the last tensor read and its moments: readers of one tensor run one after another
    last: dict[str, tuple[torch.Tensor, int] | None] = {"read": None}
    tokens: dict[str, torch.Tensor | None] = {"mask": None}

    def hook(module: nn.Linear, inputs: tuple) -> None:  # registered on `linears` only
        if not inputs or not isinstance(inputs[0], torch.Tensor) or inputs[0].shape[-1] != module.in_features:
            return
        x = inputs[0]
        if last["read"] is not None and last["read"][0] is x:
            source[module] = last["read"][1]
            return
        key = source.setdefault(module, len(moments))
        if key not in moments:
            moments[key] = InputMoments(with_cov and module.in_features <= MAX_FIT_INPUTS)
        rows = x.detach().float()
        moments[key].add(token_rows(rows if rows.dim() > 2 else rows[:, None], tokens["mask"]))
        last["read"] = (x, key)

    run_calibration(model, calib, device, batch_size, [m.register_forward_pre_hook(hook) for m in linears], tokens)
    stats = {key: moment.stats() for key, moment in moments.items() if moment.rows}
    return {m: stats[key] for m, key in source.items() if key in stats} | known

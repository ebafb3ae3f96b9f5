"""Calibration statistics: the calibration batches run with hooks, restricted to real tokens, and
the mean and covariance of a Linear's inputs that scoring centres on and compensation refits with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from core.accel import channels_last, memory_layout
from core.data import device_batches
from core.inputs import Inputs


@dataclass(frozen=True)
class InputStats:
    """Calibration statistics of a consumer's inputs: their mean and, for least-squares compensation,
    their covariance (None: compensate with the mean only). `half` holds the same statistics of every
    other calibration batch (the first, the third, ...) and `rows` how many input vectors the whole
    counts, so that the fit can be tried on one half and judged on the other (core.surgery.compensation);
    None when the calibration ran in a single batch."""

    mean: torch.Tensor
    cov: torch.Tensor | None = None
    half: InputStats | None = None
    rows: float = 0.0

    def restricted(self, kept: torch.Tensor) -> InputStats:
        """The statistics of the inputs where `kept` (a boolean mask) is true."""
        return InputStats(self.mean[kept], None if self.cov is None else self.cov[kept][:, kept],
                          None if self.half is None else self.half.restricted(kept), self.rows)


class InputMoments:
    """Running sums of a layer's inputs (rows of a 2-D tensor) for `InputStats`, and with the covariance,
    those of every other batch for its `half`."""

    def __init__(self, with_cov: bool, halved: bool = True) -> None:
        self.with_cov = with_cov
        # a device tensor once weighted rows come: counting them on the host would wait for the device
        self.rows: torch.Tensor | int = 0
        self.total: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None
        self.batches = 0
        self.half = InputMoments(with_cov, halved=False) if with_cov and halved else None

    def add(self, rows: torch.Tensor, keep: torch.Tensor | None = None) -> None:
        """Add `rows`, only those where `keep` (0 or 1 per row) is 1 when given."""
        rows = rows.double()
        weighted = rows if keep is None else rows * keep.to(rows.dtype)[:, None]
        total = weighted.sum(0)
        gram = weighted.T @ rows if self.with_cov else None
        count = len(rows) if keep is None else keep.sum()
        self._accumulate(total, gram, count)
        if self.half is not None and self.batches % 2 == 0:
            self.half._accumulate(total, gram, count)
        self.batches += 1

    def _accumulate(self, total: torch.Tensor, gram: torch.Tensor | None, count: torch.Tensor | int) -> None:
        self.total = total if self.total is None else self.total + total
        if gram is not None:
            self.gram = gram if self.gram is None else self.gram + gram
        self.rows = self.rows + count

    def stats(self) -> InputStats:
        assert self.total is not None
        mean = self.total / self.rows
        # summed in float64, where E[x²] − E[x]² does not cancel away; kept in float32 (a ViT-B's
        # twelve 3072-wide MLPs would hold 900 MB of covariances in float64, and as much for their halves)
        cov = None if self.gram is None else self.gram / self.rows - torch.outer(mean, mean)
        half = self.half.stats() if self.half is not None and self.batches >= 2 else None
        return InputStats(mean.float().cpu(), None if cov is None else cov.float().cpu(), half, float(self.rows))


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
    set to each batch's real tokens (`real_tokens`), then remove the hooks (`handles`); in channels_last where
    core.accel.uses_channels_last says so."""
    model.eval()
    try:
        with memory_layout([model], calib[:1], device) as nhwc:
            for batch in device_batches(calib, device, batch_size):
                tokens["mask"] = real_tokens(model, batch)
                (channels_last(batch) if nhwc else batch).call(model)
    finally:
        for handle in handles:
            handle.remove()


ForwardHook = Callable[[nn.Module, tuple, Any], None]
PreHook = Callable[[nn.Module, tuple], None]


@dataclass
class CalibrationPass:
    """One run of the calibration batches that several statistics share: each gatherer adds its hooks
    (which read `tokens["mask"]`, the real tokens of the batch being run) and keeps what they see, `run`
    runs the batches once with all of them, and each gatherer then finishes from what it kept. A step's
    unit scores, head scores and reader statistics cost one pass over the calibration set, not three.
    Hooks are registered only for the run, so a gatherer may run the model while it adds them."""

    model: nn.Module
    tokens: dict[str, torch.Tensor | None] = field(default_factory=lambda: {"mask": None})
    _forward: list[tuple[nn.Module, ForwardHook]] = field(default_factory=list)
    _pre: list[tuple[nn.Module, PreHook]] = field(default_factory=list)

    def forward_hook(self, module: nn.Module, hook: ForwardHook) -> None:
        self._forward.append((module, hook))

    def forward_pre_hook(self, module: nn.Module, hook: PreHook) -> None:
        self._pre.append((module, hook))

    @torch.no_grad()
    def run(self, calib: Inputs, device: torch.device, batch_size: int) -> None:
        handles = [m.register_forward_pre_hook(h) for m, h in self._pre] + [
            m.register_forward_hook(h) for m, h in self._forward]
        run_calibration(self.model, calib, device, batch_size, handles, self.tokens)


def token_rows(act: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The unit vectors of `act` (batch × positions × units) as rows, and which of them are real tokens
    (None: all): a padding position's activations never reach the output, so they must not shape the
    statistics a consumer is refitted on (short review snippets padded to 64 tokens are mostly padding).
    A row mask rather than the real rows alone: selecting them would wait for the device to count them."""
    rows = act.reshape(-1, act.shape[-1])
    if mask is not None and act.shape[:2] == mask.shape:
        return rows, mask.reshape(-1)
    return rows, None


# Widest input whose covariance `linear_input_stats` keeps (a VGG classifier reads 25088 features:
# their float64 Gram matrix alone would take 5 GB); wider readers get the mean only.
MAX_FIT_INPUTS = 4096


def linear_input_stats(model: nn.Module, calib: Inputs, device: torch.device, batch_size: int,
                       with_cov: bool, known: dict[nn.Linear, InputStats] | None = None
                       ) -> dict[nn.Linear, InputStats]:
    """Statistics of every Linear's inputs on the calibration data (real tokens only): what a Linear
    that loses input columns as a reader, not as the removed units' consumer (every reader of a
    residual-stream channel), makes up for them with. Linears that read the same tensor (an
    attention's query, key and value) share one set of statistics. Those in `known` (consumers the
    unit scoring already gathered them for) are returned as they are, not gathered again."""
    known = known or {}
    calibration = CalibrationPass(model)
    finish = attach_linear_inputs(calibration, with_cov, skip=set(known))
    calibration.run(calib, device, batch_size)
    return finish() | known


def attach_linear_inputs(calibration: CalibrationPass, with_cov: bool, skip: set[nn.Module]
                         ) -> Callable[[], dict[nn.Linear, InputStats]]:
    """`linear_input_stats` as hooks of `calibration`, for every Linear but those in `skip`; the
    returned function gives the statistics once the pass ran."""
    linears = [m for m in calibration.model.modules() if isinstance(m, nn.Linear) and m not in skip]
    moments: dict[int, InputMoments] = {}
    source: dict[nn.Linear, int] = {}  # reader -> the moments of the tensor it read
    # the last tensor read and its moments: readers of one tensor run one after another
    last: dict[str, tuple[torch.Tensor, int] | None] = {"read": None}

    def hook(module: nn.Module, inputs: tuple) -> None:  # registered on `linears` only
        assert isinstance(module, nn.Linear)
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
        moments[key].add(*token_rows(rows if rows.dim() > 2 else rows[:, None], calibration.tokens["mask"]))
        last["read"] = (x, key)

    for linear in linears:
        calibration.forward_pre_hook(linear, hook)

    @torch.no_grad()
    def finish() -> dict[nn.Linear, InputStats]:
        stats = {key: moment.stats() for key, moment in moments.items() if moment.rows}
        return {m: stats[key] for m, key in source.items() if key in stats}

    return finish

"""Compensation in convolutions: a convolution that loses input channels refits its kept channels'
weights tap by tap, as a Linear does (core/surgery/compensation.py), and a CNN's scoring pass pairs
each layer with the convolution it feeds (direct_consumers)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from core.data import Dataset
from core.importance.divergence import direct_consumers
from core.importance.statistics import InputMoments, InputStats
from core.inputs import Inputs
from core.options import CompressOptions, Target
from core.run.pipeline import prepared_run
from core.run.stages import group_candidates, step_scoring
from core.surgery.apply import apply_plan
from core.surgery.compensation import compensate
from core.surgery.groups import build_graph
from core.surgery.units import UnitKey, UnitKind


def channel_stats(x: torch.Tensor) -> InputStats:
    """The statistics of x's channel vectors over every sample and position, in calibration batches."""
    moments = InputMoments(with_cov=True)
    for part in x.split(100):
        moments.add(part.movedim(1, -1).reshape(-1, x.shape[1]))
    return moments.stats()


def test_a_convolution_rebuilds_a_removed_channel_at_every_tap() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(400, 6, 9, 9, generator=gen) + 1.0
    x[:, 5] = 2 * x[:, 0] - x[:, 1] + 3  # the channel to remove is a linear function of two kept ones
    conv = nn.Conv2d(6, 4, 3, bias=False)  # unpadded: every position of the output sees real inputs
    with torch.no_grad():
        before = conv(x)
    stats = channel_stats(x)

    def error_after_removal(stats: InputStats | None) -> float:
        pruned = copy.deepcopy(conv)
        if stats is not None:
            compensate(pruned, [5], stats)
        with torch.no_grad():
            pruned.weight[:, 5] = 0  # what removing the channel does to the output
            return float((pruned(x) - before).abs().mean())

    untouched = error_after_removal(None)
    mean_only = error_after_removal(InputStats(stats.mean))
    fitted = error_after_removal(stats)
    assert mean_only < 0.8 * untouched
    assert fitted < 0.01 * mean_only
    grown = copy.deepcopy(conv)
    compensate(grown, [5], stats)
    assert grown.bias is not None  # the mean went into a bias the layer did not have


class Small(nn.Module):
    """A plain conv → BN → ReLU → conv pair, and an inverted residual (1×1 expand → depthwise →
    1×1 project), the two ways CNNs feed one layer's channels to the next."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.expand = nn.Conv2d(16, 32, 1)
        self.depthwise = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.project = nn.Conv2d(32, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        h = h + self.project(nn.functional.relu6(self.depthwise(nn.functional.relu6(self.expand(h)))))
        return self.head(h.mean((2, 3)))


def duplicated(model: Small) -> Small:
    """`model` with conv1's channel 3 a copy of channel 2 and the inverted residual's channel 7 a copy
    of channel 6 (through the depthwise layer too, and active: biased above ReLU6's floor): what a
    consumer can rebuild from the kept ones."""
    with torch.no_grad():
        model.conv1.weight[3] = model.conv1.weight[2]
        model.expand.bias[6] = model.depthwise.bias[6] = 0.5
        for pair in ((model.expand.weight, model.expand.bias), (model.depthwise.weight, model.depthwise.bias)):
            for p in pair:
                p[7] = p[6]
        model.bn1.weight[3], model.bn1.bias[3] = model.bn1.weight[2], model.bn1.bias[2]
    return model


def run_for(model: nn.Module, options: CompressOptions):
    torch.manual_seed(1)
    x = torch.randn(128, 3, 12, 12)
    model.eval()
    data = Dataset(Inputs.single(x), model(x).argmax(1).detach())
    return prepared_run(model, data, Target(params_reduction=0.3), options)


def test_each_layer_is_paired_with_the_convolution_its_channels_feed() -> None:
    model = Small().eval()
    x = Inputs.single(torch.randn(2, 3, 12, 12))
    pairs = direct_consumers(model, build_graph(model, x), x)
    # conv1 reaches conv2 through its BatchNorm and ReLU; expand reaches the depthwise layer, which does not
    # mix channels, and conv2 and project reach a residual sum: neither is a consumer
    assert pairs == {model.conv1: model.conv2, model.depthwise: model.project}


def _cut_error(plan_units: dict[str, list[int]], compensate: bool, fit: bool) -> float:
    options = CompressOptions(device="cpu", allocation="scores", round_to=None, calibration_samples=128,
                              mean_compensation=compensate, least_squares_compensation=fit)
    model, run = run_for(duplicated(Small()), options)
    graph = build_graph(model, run.spec.example)
    groups = group_candidates(run.spec, run.cache, model, graph)
    means = step_scoring(run, model, graph, groups).means
    model.eval()  # the BatchNorms normalise with their running statistics, as in the exported model
    before = run.spec.calib.call(model).detach()
    apply_plan(model, run.spec.example, {UnitKey(UnitKind.CHANNELS, name): idxs for name, idxs in plan_units.items()},
               means)
    return float((run.spec.calib.call(model).detach() - before).norm() / before.norm())


def test_a_cnn_step_makes_up_for_removed_channels_in_the_convolutions_that_read_them() -> None:
    for plan in ({"conv1": [3]}, {"depthwise": [7]}):
        fitted = _cut_error(plan, compensate=True, fit=True)
        mean_only = _cut_error(plan, compensate=True, fit=False)
        none = _cut_error(plan, compensate=False, fit=False)
        assert fitted < 0.1 * mean_only < 0.1 * none, plan


class _SamePadding(nn.Conv2d):
    """A convolution subclass as EfficientNet's packages write them: padding in its own forward."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.conv2d(nn.functional.pad(x, (1, 1, 1, 1)), self.weight, self.bias)


def test_layers_of_a_subclass_count_their_multiply_accumulates() -> None:
    from core.measure.size import count_macs_params

    plain = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))
    subclassed = nn.Sequential(_SamePadding(3, 8, 3), nn.ReLU(), _SamePadding(8, 4, 3))
    x = Inputs.single(torch.randn(2, 3, 10, 10))
    macs, params = count_macs_params(plain, x.bind(plain))
    assert macs > 8 * 3 * 9 * 100
    assert count_macs_params(subclassed, x.bind(subclassed)) == (macs, params)

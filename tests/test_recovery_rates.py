"""Recovery's learning rate per module (core.recovery.rates): a layer whose weights are tiny because a
large scale follows it, as in exported graphs, must not be wrecked by recovery."""

from __future__ import annotations

import copy
import statistics

import pytest
import torch
from torch import nn

from core.data import Dataset
from core.inputs import Inputs
from core.progress import Reporter
from core.recovery.distill import recover
from core.recovery.rates import OUT_OF_SCALE, scaled_param_groups
from core.tasks.generic import Generic, normalised_mse

CPU = torch.device("cpu")
# how much smaller than its neighbours the exported layer's weights are, and the scale that follows it
SHRINK = 1e-4


class Rescaled(nn.Module):
    """A convolution stored at SHRINK of its size and multiplied back after it, as exporters leave
    a scale they did not fold (PP-OCRv4's detector has one at mean |w| 2e-5)."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv
        with torch.no_grad():
            conv.weight.mul_(SHRINK)
            assert conv.bias is not None
            conv.bias.mul_(SHRINK)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) / SHRINK


class ExportedLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
            Rescaled(nn.Conv2d(16, 16, 3, padding=1)), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
            nn.Conv2d(16, 4, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def test_out_of_scale_modules_learn_at_a_rate_scaled_to_their_size() -> None:
    model = ExportedLike()
    groups = scaled_param_groups(model, 1e-3)
    rates = {id(p): group["lr"] for group in groups for p in group["params"]}
    assert len(rates) == sum(len(group["params"]) for group in groups) == len(list(model.parameters()))
    rescaled = model.layers[2]
    assert isinstance(rescaled, Rescaled)
    tiny = rescaled.conv
    others = [m for m in model.layers if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        rms = float(tiny.weight.pow(2).mean().sqrt())
        median = statistics.median(float(m.weight.pow(2).mean().sqrt()) for m in [*others, tiny])
    assert rates[id(tiny.weight)] == rates[id(tiny.bias)] == pytest.approx(1e-3 * rms / (OUT_OF_SCALE * median))
    assert all(rates[id(p)] == 1e-3 for m in others for p in m.parameters())


def test_a_tied_parameter_is_in_one_group_and_frozen_ones_in_none() -> None:
    embedding = nn.Embedding(10, 8)
    head = nn.Linear(8, 10, bias=False)
    head.weight = embedding.weight
    frozen = nn.Linear(8, 8)
    frozen.requires_grad_(False)
    model = nn.Sequential(embedding, frozen, head)
    groups = scaled_param_groups(model, 1e-3)
    assert [p for group in groups for p in group["params"]] == [embedding.weight]


@pytest.mark.parametrize("scaled", [True, False])
def test_recovery_repairs_a_model_with_a_tiny_layer(scaled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher = ExportedLike().eval()
    student = copy.deepcopy(teacher)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    x = torch.randn(64, 3, 8, 8)
    if not scaled:
        monkeypatch.setattr("core.recovery.distill.scaled_param_groups",
                            lambda model, lr: [{"params": list(model.parameters()), "lr": lr}])

    def error() -> float:
        with torch.no_grad():
            return float(normalised_mse(student(x), teacher(x)))

    before = error()
    recover(student, teacher, Dataset(Inputs.single(x), None), [], 30, device=CPU, batch_size=32, lr=1e-4,
            weight_decay=0.0, temperature=1.0, kd_weight=1.0, feature_weight=0.0, seed=0,
            reporter=Reporter(None, None), task=Generic())
    # with one rate for all, Adam's first steps move the tiny layer by more than its own size
    if scaled:
        assert error() < 0.5 * before
    else:
        assert error() > before

"""torch-pruning's criteria as the benchmarks' baselines: each scores what it names, and each runs a whole job."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from core.data import Dataset
from core.inputs import Inputs
from core.options import CompressOptions, Criterion, Target
from core.run.pipeline import compress, prepared_run
from core.run.stages import group_candidates, step_scoring
from core.surgery.groups import build_graph


def _convnet() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5),
    ).eval()


def _scores(model: nn.Module, criterion: Criterion) -> dict[str, torch.Tensor]:
    data = Dataset(Inputs.single(torch.randn(64, 3, 8, 8)))
    model, run = prepared_run(model, data, Target(macs_reduction=0.3), CompressOptions(criterion=criterion))
    graph = build_graph(model, run.spec.example)
    groups = group_candidates(run.spec, run.cache, model, graph)
    scoring = step_scoring(run, model, graph, groups)
    return {g.key.name: s for g, s in zip(groups, scoring.scores)}


def test_bn_scale_ranks_channels_by_their_batchnorm_scale() -> None:
    model = _convnet()
    gamma = torch.linspace(-2.0, 2.0, 16)[torch.randperm(16)]
    with torch.no_grad():
        model[1].weight.copy_(gamma)
    scores = _scores(model, Criterion.BN_SCALE)["0"]
    assert torch.equal(scores.argsort(), gamma.abs().argsort())


def test_lamp_scores_are_its_own_across_layers() -> None:
    # LAMP's score of a layer's largest weight is 1 in every layer, whatever the layer's scale: the
    # planner must not divide it by the layer's mean, or LAMP is magnitude again
    model = _convnet()
    with torch.no_grad():
        model[0].weight.mul_(100.0)
    scores = _scores(model, Criterion.LAMP)
    assert set(scores) == {"0", "3"}
    for layer in scores.values():
        assert torch.all(layer <= 1.0 + 1e-6)
    magnitude = _scores(model, Criterion.L2)
    assert all(abs(float(s.mean()) - 1.0) < 1e-4 for s in magnitude.values())  # mean-normalised
    assert not all(abs(float(s.mean()) - 1.0) < 1e-4 for s in scores.values())


@pytest.mark.parametrize("criterion", [c for c in Criterion if c != Criterion.DIVERGENCE])
def test_every_baseline_runs_a_job_to_the_target(criterion: Criterion, digits_model, digits_arrays,
                                                 tmp_path: Path) -> None:
    x, y = digits_arrays
    data = Dataset(Inputs.single(torch.from_numpy(x)), torch.from_numpy(y))
    options = CompressOptions(criterion=criterion, stages=("filters",), recovery_iterations=5,
                              final_recovery_iterations=0, latency_runs=1)
    report = compress(digits_model, data, Target(macs_reduction=0.2, max_accuracy_drop=1.0), options, tmp_path).report
    assert report.target_met and report.options.criterion == criterion
    assert np.isfinite(report.accuracy_after)

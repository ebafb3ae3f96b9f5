"""The pieces of the method, each checked against a model where the answer is known."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import onnxruntime  # noqa: F401  (fail fast if the runtime is missing)
import pytest
import torch
import torchvision

from core.data import Dataset
from core.errors import ExportError
from core.export.artifacts import export_onnx, verify_onnx
from core.graph.blocks import find_blocks, remove_block
from core.importance.divergence import DivergenceScorer, block_divergence, filter_divergence
from core.inputs import Inputs
from core.progress import Reporter
from core.recovery.distill import recover
from core.recovery.features import pick_feature_points
from core.surgery.apply import apply_plan
from core.surgery.groups import build_graph, prunable_groups
from core.surgery.plan import make_plan, score_groups
from core.surgery.units import UnitKey, UnitKind
from core.tasks.classification import Classification


def _x(digits_arrays) -> torch.Tensor:
    return torch.from_numpy(digits_arrays[0][:256])


def test_dead_filter_scores_lowest_and_goes_first(digits_model, digits_arrays) -> None:
    conv = digits_model.blocks[0].conv1
    with torch.no_grad():
        conv.weight[5].zero_()
    x = _x(digits_arrays)
    graph = build_graph(digits_model, Inputs.single(x[:2]))
    scores = filter_divergence(digits_model, graph, Inputs.single(x), torch.device("cpu"), 64)
    assert int(scores[conv].argmin()) == 5 and float(scores[conv][5]) == 0.0

    groups = prunable_groups(graph, digits_model, [digits_model.fc], {}, 0.125, 1)
    normalised = score_groups(groups, DivergenceScorer(scores))
    plan = make_plan(groups, normalised, 1, None)
    assert plan == {UnitKey(UnitKind.CHANNELS, "blocks.0.conv1"): [5]}
    apply_plan(digits_model, Inputs.single(x[:2]), plan)
    assert digits_model.blocks[0].conv1.out_channels == 31
    assert digits_model.blocks[0].bn1.num_features == 31
    assert digits_model.blocks[0].conv2.in_channels == 31
    assert digits_model(x).shape == (256, 10)


def test_plan_respects_minimum_width_and_round_to(digits_model, digits_arrays) -> None:
    x = _x(digits_arrays)
    graph = build_graph(digits_model, Inputs.single(x[:2]))
    widths: dict[UnitKey, int] = {}
    groups = prunable_groups(graph, digits_model, [digits_model.fc], widths, 0.25, 1)
    scores = [torch.rand(g.width) for g in groups]
    plan = make_plan(groups, scores, 10_000, round_to=8)
    apply_plan(digits_model, Inputs.single(x[:2]), plan)
    for group in prunable_groups(build_graph(digits_model, Inputs.single(x[:2])), digits_model, [digits_model.fc],
                                 widths, 0.25, 1):
        assert group.width >= widths[group.key] // 4
        assert group.width % 8 == 0
    assert digits_model.fc.out_features == 10


def test_plan_caps_hold_a_group_back_and_the_others_give_the_rest(digits_model, digits_arrays) -> None:
    x = _x(digits_arrays)
    graph = build_graph(digits_model, Inputs.single(x[:2]))
    groups = prunable_groups(graph, digits_model, [digits_model.fc], {}, 0.125, 1)
    # the first group's units score lowest of all, so an uncapped plan takes them first
    scores = [torch.arange(g.width, dtype=torch.float32) + (0.0 if i == 0 else 1000.0) for i, g in enumerate(groups)]
    assert len(make_plan(groups, scores, 4, None)[groups[0].key]) == 4
    caps = [1] + [g.capacity for g in groups[1:]]
    plan = make_plan(groups, scores, 4, None, caps)
    assert len(plan[groups[0].key]) == 1
    assert sum(len(units) // g.ch_groups for g in groups[1:] for units in [plan.get(g.key, [])]) == 3


def test_block_that_passes_its_input_through_has_zero_divergence(digits_model, digits_arrays) -> None:
    bn = digits_model.blocks[1].bn2
    with torch.no_grad():
        bn.weight.zero_()
        bn.bias.zero_()
    candidates = find_blocks(digits_model, Inputs.single(_x(digits_arrays)[:2]))
    scores = block_divergence(digits_model, candidates, Inputs.single(_x(digits_arrays)),
                              torch.device("cpu"), 64)
    assert min(scores, key=scores.get) == "blocks.1"
    assert scores["blocks.1"] < 1e-6 < min(v for k, v in scores.items() if k != "blocks.1")


def test_blocks_found_with_identity_and_projection_shortcuts(digits_model, digits_arrays) -> None:
    found = {c.name: c.shortcut for c in find_blocks(digits_model, Inputs.single(_x(digits_arrays)[:2]))}
    assert found == {"blocks.0": None, "blocks.1": None, "blocks.2": "downsample", "blocks.3": None}
    resnet = torchvision.models.resnet18(num_classes=10).eval()
    kinds = [c.kind for c in find_blocks(resnet, Inputs.single(torch.randn(2, 3, 64, 64)))]
    assert kinds.count("identity") == 5 and kinds.count("projection") == 3
    # a RegNet stage with one block looks residual as a whole too; the block is listed once
    regnet = torchvision.models.regnet_y_400mf(num_classes=10).eval()
    names = [c.name for c in find_blocks(regnet, Inputs.single(torch.randn(2, 3, 32, 32)))]
    assert "trunk_output.block1.block1-0" in names and "trunk_output.block1" not in names
    assert len(names) == 16


def test_removing_blocks_keeps_the_model_running(digits_model, digits_arrays) -> None:
    x = _x(digits_arrays)
    for candidate in find_blocks(digits_model, Inputs.single(x[:2])):
        remove_block(digits_model, candidate)
    assert digits_model(x).shape == (256, 10)
    assert not find_blocks(digits_model, Inputs.single(x[:2]))


def test_unlabeled_recovery_pulls_student_towards_teacher(digits_model, digits_arrays) -> None:
    x = _x(digits_arrays)
    student = copy.deepcopy(digits_model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def gap() -> float:
        with torch.no_grad():
            return float((student(x).softmax(1) - digits_model(x).softmax(1)).abs().sum(1).mean())

    before = gap()
    recover(student, digits_model, Dataset(Inputs.single(x), None),
            pick_feature_points(digits_model, Inputs.single(x[:2])), 60,
            device=torch.device("cpu"), batch_size=64, lr=1e-3, weight_decay=1e-4, temperature=3.0,
            kd_weight=1.0, feature_weight=0.5, seed=0, reporter=Reporter(None, None), task=Classification())
    assert gap() < before / 2


def test_labelled_recovery_also_matches_the_teachers_soft_outputs(digits_model, digits_arrays) -> None:
    x, y = _x(digits_arrays), torch.from_numpy(digits_arrays[1][:256]).long()
    noisy = copy.deepcopy(digits_model)
    torch.manual_seed(0)  # the noise, whatever tests ran before in this process
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(0.05 * torch.randn_like(p))

    def gap_after(kd_weight: float) -> float:
        student = copy.deepcopy(noisy)
        recover(student, digits_model, Dataset(Inputs.single(x), y), [], 40, device=torch.device("cpu"), batch_size=64,
                lr=1e-3, weight_decay=1e-4, temperature=3.0, kd_weight=kd_weight, feature_weight=0.0, seed=0,
                reporter=Reporter(None, None), task=Classification())
        with torch.no_grad():
            return float((student(x).softmax(1) - digits_model(x).softmax(1)).abs().sum(1).mean())

    # CE alone pushes towards one-hot labels; the KL term keeps the teacher's confidences
    assert gap_after(1.0) < 0.7 * gap_after(0.0)


def test_feature_points_span_the_depth(digits_model, digits_arrays) -> None:
    points = pick_feature_points(digits_model, Inputs.single(_x(digits_arrays)[:2]))
    assert points == ["blocks.0", "blocks.2", "blocks.3"]


def test_onnx_verification_catches_a_model_that_disagrees(digits_model, digits_arrays, tmp_path: Path) -> None:
    x = _x(digits_arrays)
    path = tmp_path / "m.onnx"
    export_onnx(digits_model, Inputs.single(x[:2]), path)
    assert verify_onnx(digits_model, path, Inputs.single(x)) < 1e-4
    other = copy.deepcopy(digits_model)
    with torch.no_grad():
        other.fc.bias.add_(1.0)
    with pytest.raises(ExportError, match="disagrees"):
        verify_onnx(other, path, Inputs.single(x))


def test_drift_is_zero_for_the_original_and_grows_with_damage(digits_model, digits_arrays) -> None:
    from core.tasks.base import collect
    from core.tasks.classification import Classification

    x = Inputs.single(_x(digits_arrays)[:200])
    cpu = torch.device("cpu")
    task = Classification()
    reference = collect(digits_model, x, cpu, task)
    assert task.drift(collect(digits_model, x, cpu, task), reference) == pytest.approx(0.0, abs=1e-6)
    drifts = []
    for scale in (0.01, 0.1):
        damaged = copy.deepcopy(digits_model)
        with torch.no_grad():
            for p in damaged.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * scale)
        drifts.append(task.drift(collect(damaged, x, cpu, task), reference))
    assert 0 < drifts[0] < drifts[1]


def test_least_squares_compensation_rebuilds_a_removed_input_from_the_kept_ones(monkeypatch) -> None:
    from core.importance.statistics import InputMoments, InputStats
    from core.surgery import compensation
    from core.surgery.compensation import compensate

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 6, generator=gen) + 1.0
    x[:, 5] = 2 * x[:, 0] - x[:, 1] + 3  # the input to remove is a linear function of two kept ones
    layer = torch.nn.Linear(6, 4)
    moments = InputMoments(with_cov=True)
    for part in x.split(1000):  # the sums accumulate over calibration batches
        moments.add(part)
    stats = moments.stats()
    assert torch.allclose(stats.mean, x.mean(0), atol=1e-5)
    assert stats.half is not None and torch.allclose(stats.half.mean, torch.cat([x[:1000], x[2000:3000]]).mean(0),
                                                     atol=1e-5)
    with torch.no_grad():
        before = layer(x)

    def error_after_removal(stats: InputStats) -> float:
        pruned = copy.deepcopy(layer)
        compensate(pruned, [5], stats)
        with torch.no_grad():
            pruned.weight[:, 5] = 0  # what removing the column does to the output
            return float((pruned(x) - before).abs().max())

    mean_only = error_after_removal(InputStats(stats.mean))
    assert mean_only > 0.5
    assert error_after_removal(stats) < 0.01 * mean_only  # the held-out halves choose the smallest ridge
    monkeypatch.setattr(compensation, "RIDGE", 1e-9)  # the ridge of statistics without halves
    assert error_after_removal(dataclasses.replace(stats, half=None)) < 1e-4


def test_the_ridge_that_predicts_held_out_batches_best_is_chosen() -> None:
    """Few calibration vectors for many inputs that do not predict each other: a small ridge fits
    the calibration set's noise, and the held-out half of its batches says so."""
    from core.importance.statistics import InputMoments
    from core.surgery.compensation import RIDGE, RIDGES, _fit, chosen_ridge

    gen = torch.Generator().manual_seed(0)
    x, unseen = torch.randn(96, 64, generator=gen) + 1.0, torch.randn(4000, 64, generator=gen) + 1.0
    moments = InputMoments(with_cov=True)
    for part in x.split(16):
        moments.add(part)
    stats = moments.stats()
    kept, removed = torch.arange(32, 64), torch.arange(32)
    w_removed = torch.randn(8, 32, 1, generator=gen, dtype=torch.float64)

    def unseen_error(ridge: float) -> float:
        coef, offset = _fit(stats, kept, removed, ridge)
        residual = unseen[:, removed].double() - offset - unseen[:, kept].double() @ coef
        return float((residual @ w_removed[..., 0].T).pow(2).mean())

    chosen = chosen_ridge(stats, kept, removed, w_removed)
    assert chosen >= 1.0
    assert unseen_error(chosen) < 0.8 * unseen_error(RIDGE)
    assert unseen_error(chosen) <= 1.1 * min(unseen_error(r) for r in RIDGES)

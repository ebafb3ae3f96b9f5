"""A step's scoring runs the calibration set once: unit scores, head scores and the statistics every
Linear's readers compensate with come from the hooks of one pass (core.importance.statistics.CalibrationPass)."""

from __future__ import annotations

import math

import torch
from torch import nn

from core.options import Allocation, CompressOptions, Target
from core.run.pipeline import prepared_run
from core.run.stages import group_candidates, step_scoring
from core.surgery.groups import build_graph
from core.surgery.units import UnitKind
from tests.test_trial import _vit


def test_a_step_scores_heads_channels_and_readers_in_one_pass_over_the_calibration_set() -> None:
    model, data = _vit()
    options = CompressOptions(allocation=Allocation.SCORES, batch_size=16)
    model, run = prepared_run(model, data, Target(macs_reduction=0.3, max_accuracy_drop=1.0), options)
    graph = build_graph(model, run.spec.example)
    groups = group_candidates(run.spec, run.cache, model, graph)
    batches: list[int] = []

    def count(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        batches.append(len(next(t for t in [*args, *kwargs.values()] if isinstance(t, torch.Tensor))))

    counter = model.register_forward_pre_hook(count, with_kwargs=True)
    try:
        scoring = step_scoring(run, model, graph, groups)
    finally:
        counter.remove()
    calib = len(run.spec.calib)
    # the calibration batches once, after the two samples that find which layers feed a Linear directly
    assert batches == [2] + [16] * (calib // 16) + ([calib % 16] if calib % 16 else [])
    kinds = {key.kind for key in scoring.means}
    assert kinds == {UnitKind.CHANNELS, UnitKind.HEADS, UnitKind.READERS}
    # every Linear that reads a pruned input has what it compensates with, heads' projections included
    readers = {name for key, (name, _stats) in scoring.means.items() if key.kind == UnitKind.READERS}
    linears = {name for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert readers == linears
    assert all(torch.isfinite(s).all() and len(s) > 0 for s in scoring.scores)
    assert math.isclose(sum(len(s) for s in scoring.scores), sum(g.width for g in groups))

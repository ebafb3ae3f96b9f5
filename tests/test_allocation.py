"""Drift allocation (core/run/allocation.py), and the compensation of Linears that lose inputs as readers."""

from __future__ import annotations

import math

import torch

from core.data import Dataset
from core.graph.attention import AttentionSite
from core.importance.statistics import linear_input_stats
from core.inputs import Inputs
from core.options import Allocation, CompressOptions, Target
from core.run.allocation import drift_per_size
from core.run.pipeline import prepared_run
from core.run.stages import allocates_by_drift, group_candidates, step_scoring
from core.surgery.apply import apply_plan
from core.surgery.groups import build_graph
from core.surgery.plan import make_plan
from core.surgery.units import UnitKey, UnitKind
from tests.test_transformers import small_bert, tokens
from tests.two_paths import TwoPaths, two_paths_run


def test_units_that_barely_reach_the_output_go_first_whatever_their_scores():
    """Normalised per layer, both layers' scores average 1, so a global ranking takes units from
    both; measured, the quiet layer's units cost a fraction of the drift per parameter."""
    options = CompressOptions(device="cpu", allocation="scores", round_to=None, calibration_samples=128)
    model, run, groups, graph = two_paths_run(TwoPaths(), options)
    names = [g.key.name for g in groups]
    assert sorted(names) == ["narrow", "wide"]
    scoring = step_scoring(run, model, graph, groups)
    k = groups[names.index("narrow")].capacity
    assert {key.name for key in make_plan(groups, scoring.scores, k, None)} == {"narrow", "wide"}

    calibrated = drift_per_size(run, model, graph, groups, scoring.scores, scoring.means)
    assert {key.name for key in make_plan(groups, calibrated, k, None)} == {"narrow"}
    wide, narrow = calibrated[names.index("wide")], calibrated[names.index("narrow")]
    assert narrow.median() * 20 < wide.median()


def test_a_group_that_cannot_be_cut_ranks_last():
    options = CompressOptions(device="cpu", allocation="drift", round_to=None, calibration_samples=128,
                              min_width_fraction=1.0)
    model, run, groups, graph = two_paths_run(TwoPaths(), options)
    assert all(g.capacity == 0 for g in groups)
    scores = [torch.ones(g.width) for g in groups]
    assert all(torch.isinf(s).all() for s in drift_per_size(run, model, graph, groups, scores, {}))


def test_auto_allocation_measures_drift_where_heads_compete_with_channels():
    options = CompressOptions(device="cpu", round_to=None)
    model, run = prepared_run(small_bert(), Dataset(Inputs.single(tokens()), torch.arange(48) % 3),
                              Target(params_reduction=0.5), options)
    bert = group_candidates(run.spec, run.cache, model, build_graph(model, run.spec.example))
    channels = two_paths_run(TwoPaths(), options)[2]
    assert any(isinstance(g.group, AttentionSite) for g in bert)
    assert allocates_by_drift(Allocation.AUTO, bert) and not allocates_by_drift(Allocation.AUTO, channels)
    assert allocates_by_drift(Allocation.DRIFT, channels) and not allocates_by_drift(Allocation.SCORES, bert)


def _cut_error(fit: bool, compensate: bool = True) -> float:
    """Output error after removing a `wide` unit that copies another one: `wide` feeds two Linears
    through a ReLU, so the cut reaches both as readers, not as the units' one consumer."""
    model = TwoPaths()
    with torch.no_grad():
        model.wide.weight[3] = model.wide.weight[2]
        model.wide.bias[3] = model.wide.bias[2]
    options = CompressOptions(device="cpu", allocation="scores", round_to=None, calibration_samples=256,
                              mean_compensation=compensate, least_squares_compensation=fit)
    model, run, groups, graph = two_paths_run(model, options)
    means = step_scoring(run, model, graph, groups).means
    before = run.spec.calib.call(model).detach()
    apply_plan(model, run.spec.example, {UnitKey(UnitKind.CHANNELS, "wide"): [3]}, means)
    assert model.wide.out_features == 31
    return float((run.spec.calib.call(model).detach() - before).norm() / before.norm())


def test_readers_of_a_removed_channel_refit_on_the_channels_they_keep():
    fitted, mean_only, none = _cut_error(fit=True), _cut_error(fit=False), _cut_error(fit=False, compensate=False)
    assert fitted * 10 < mean_only < none


def test_readers_of_one_tensor_share_statistics_of_its_real_tokens():
    """An attention's query, key and value read the same hidden states: one set of statistics,
    over the positions that are not padding."""
    model = small_bert()
    x = tokens()
    real = x != 0
    attention = model.model.bert.encoder.layer[0].attention.self
    seen: dict[str, torch.Tensor] = {}
    handle = attention.query.register_forward_pre_hook(lambda _m, i: seen.update(hidden=i[0].detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    stats = linear_input_stats(model, Inputs({"input_ids": x}), torch.device("cpu"), 16, with_cov=True)
    assert stats[attention.query] is stats[attention.key] is stats[attention.value]
    assert stats[attention.query] is not stats[model.model.bert.encoder.layer[0].intermediate.dense]
    rows = seen["hidden"][real].double()
    assert torch.allclose(stats[attention.query].mean, rows.mean(0).float(), atol=1e-5)
    assert torch.allclose(stats[attention.query].cov.double(), torch.cov(rows.T, correction=0), atol=1e-5)
    without_cov = linear_input_stats(model, Inputs({"input_ids": x}), torch.device("cpu"), 16, with_cov=False)
    assert without_cov[attention.query].cov is None


def test_every_probe_removes_about_the_same_share_of_the_target(monkeypatch):
    """Drift grows faster than the cut, so probes of different sizes would price groups unfairly:
    each removes PROBE_SHARE of the target, to within one unit (or its minimum of PROBE_WIDTH)."""
    from core.run import allocation

    probes: dict[UnitKey, allocation._Probe] = {}
    original = allocation._probe

    def recorded(run, model, graph, size, group, unit_scores, means, n):
        probe = original(run, model, graph, size, group, unit_scores, means, n)
        probes[group.key] = probe
        return probe

    monkeypatch.setattr(allocation, "_probe", recorded)
    options = CompressOptions(device="cpu", round_to=None, calibration_samples=128)
    model, run = prepared_run(small_bert(), Dataset(Inputs.single(tokens()), torch.arange(48) % 3),
                              Target(params_reduction=0.5), options)
    graph = build_graph(model, run.spec.example)
    groups = group_candidates(run.spec, run.cache, model, graph)
    step_scoring(run, model, graph, groups)
    assert len(probes) == len(groups)
    for group in groups:
        probe = probes[group.key]
        unit = probe.cost / len(probe.units)
        floor = math.ceil(allocation.PROBE_WIDTH * group.width)
        assert len(probe.units) == floor or abs(probe.cost - allocation.PROBE_SHARE) <= unit + 1e-9
    assert any(len(probes[g.key].units) > math.ceil(allocation.PROBE_WIDTH * g.width) for g in groups)

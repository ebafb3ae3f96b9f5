"""Probes cost little: they skip the blocks they cannot change (core.run.prefix) and measure what a full pass
measures, and a model with many groups probes each on fewer inputs (core.run.allocation.probe_samples)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from core.data import Dataset
from core.inputs import Inputs
from core.options import CompressOptions, Target
from core.run import allocation, prefix
from core.run.allocation import drift_per_size
from core.run.pipeline import prepared_run
from core.run.prefix import PrefixCache
from core.run.stages import group_candidates, step_scoring
from core.surgery.groups import build_graph
from core.tasks.base import collect
from tests.test_trial import MODELS

OPTIONS = CompressOptions(device="cpu", allocation="scores", calibration_samples=32)


def _scored(name: str):
    model, data = MODELS[name]()
    model, run = prepared_run(model, data, Target(params_reduction=0.5), OPTIONS)
    graph = build_graph(model, run.spec.example)
    groups = group_candidates(run.spec, run.cache, model, graph)
    return model, run, graph, groups, step_scoring(run, model, graph, groups)


@pytest.mark.parametrize("name", ["bert", "llama", "convnext"])
def test_probes_that_skip_blocks_measure_what_full_passes_measure(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, run, graph, groups, scoring = _scored(name)
    calls: list[str] = []
    names = {module: n for n, module in model.named_modules()}
    blocks = [m for m in model.modules() if names[m].endswith(("layer.0", "layers.0", "features.1.0"))]
    # a layer inside the first block runs only when the block itself does (a stand-in's hooks still run)
    inner = next(m for m in blocks[0].modules() if isinstance(m, (nn.Linear, nn.Conv2d)))
    # copies of the model (tracing for the blocks) carry the hook along: only the model's own calls count
    handle = inner.register_forward_pre_hook(lambda m, _a: calls.append(names[m]) if m in names else None)
    skipped = drift_per_size(run, model, graph, groups, scoring.scores, scoring.means)
    with_cache = len(calls)
    monkeypatch.setattr(prefix, "PREFIX_CACHE_BYTES", 0)
    calls.clear()
    full = drift_per_size(run, model, graph, groups, scoring.scores, scoring.means)
    handle.remove()
    # the first block runs for the reference, the check and the probes that start in it, not for the rest
    assert with_cache < len(calls)
    for a, b in zip(skipped, full, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=0), (a, b)


def test_a_model_with_more_groups_than_the_budget_covers_probes_each_on_fewer_inputs(
        monkeypatch: pytest.MonkeyPatch) -> None:
    model, run, graph, groups, scoring = _scored("llama")
    probed: list[int] = []  # how many inputs each probe's pass ran

    def counted(model: nn.Module, x: Inputs, *args, **kwargs):
        probed.append(len(x))
        return collect(model, x, *args, **kwargs)

    monkeypatch.setattr(allocation, "collect", counted)
    drift_per_size(run, model, graph, groups, scoring.scores, scoring.means)
    assert len(probed) == len(groups) and set(probed) == {len(run.spec.calib)}, "within the budget: all of them"
    probed.clear()
    monkeypatch.setattr(allocation, "PROBE_BUDGET", 4 * len(groups))
    monkeypatch.setattr(allocation, "MIN_PROBE_SAMPLES", 4)
    fewer = drift_per_size(run, model, graph, groups, scoring.scores, scoring.means)
    assert len(probed) == len(groups) and set(probed) == {4}
    assert all(torch.isfinite(s).any() for s in fewer), "every group is still priced"


class _Stateful(nn.Module):
    """A block that leaves something behind for a later module: standing in for it would not."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
        self.register_buffer("seen", torch.zeros(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x + self.body(x)
        self.seen.add_(out.detach().mean(0))  # every call leaves more behind
        return out


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Linear(8, 8)
        self.block = _Stateful()
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.stem(x)) + self.block.seen)


def test_blocks_whose_stand_ins_change_the_outputs_are_not_kept() -> None:
    torch.manual_seed(0)
    data = Dataset(Inputs.single(torch.randn(800, 8)), torch.arange(800) % 3)
    model, run = prepared_run(_Net().eval(), data, Target(params_reduction=0.3), OPTIONS)
    spec = run.spec
    # two batches: a stand-in leaves the state as the reference pass left it, which the first batch did not see
    x = spec.recovery.inputs[: spec.task.eval_batch_size + 1]
    cache = PrefixCache.record(model, spec.example, x, spec.device, spec.task)
    assert cache.outputs == {}


def test_only_the_blocks_that_fit_the_budget_are_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    model, data = MODELS["bert"]()
    model, run = prepared_run(model, data, Target(params_reduction=0.5), OPTIONS)
    spec = run.spec
    full = PrefixCache.record(model, spec.example, spec.calib, spec.device, spec.task)
    assert len(full.outputs) == 2  # both encoder layers
    one_layer = sum(out.numel() * out.element_size() for out in next(iter(full.outputs.values())))
    monkeypatch.setattr(prefix, "PREFIX_CACHE_BYTES", one_layer)
    assert len(PrefixCache.record(model, spec.example, spec.calib, spec.device, spec.task).outputs) == 1

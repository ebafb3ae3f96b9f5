"""A plan applied to the model for a moment (core.surgery.trial): it computes what a pruned copy computes,
and leaves the model and its dependency graph as they were."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from core.data import Dataset
from core.graph.outputs import named_outputs
from core.inputs import Inputs
from core.options import CompressOptions, Target
from core.run.context import Run
from core.run.pipeline import prepared_run
from core.run.stages import group_candidates, step_scoring
from core.surgery.apply import apply_plan
from core.surgery.groups import build_graph, prunable_groups
from core.surgery.plan import make_plan
from core.surgery.trial import applied, survives_channel_cut
from tests.test_llama import tiny_llama
from tests.test_llama import tokens as llama_tokens
from tests.test_transformers import small_bert, tokens


def _digits(digits_model: nn.Module, digits_arrays) -> tuple[nn.Module, Dataset]:
    x, y = digits_arrays
    return digits_model, Dataset(Inputs.single(torch.from_numpy(x[:96])), torch.from_numpy(y[:96]))


def _vit() -> tuple[nn.Module, Dataset]:
    # class_token and pos_embedding are unwrapped parameters: torch-pruning rewrites its graph for them
    torch.manual_seed(0)
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                                 hidden_dim=32, mlp_dim=64, num_classes=4).eval()
    return model, Dataset(Inputs.single(torch.randn(48, 3, 32, 32)), torch.arange(48) % 4)


def _convnext() -> tuple[nn.Module, Dataset]:
    # its blocks' layer scales are unwrapped parameters in the stages' residual channel groups
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    torch.manual_seed(0)
    model = ConvNeXt([CNBlockConfig(16, 32, 2), CNBlockConfig(32, None, 1)], num_classes=4).eval()
    return model, Dataset(Inputs.single(torch.randn(48, 3, 32, 32)), torch.arange(48) % 4)


def _bert() -> tuple[nn.Module, Dataset]:
    return small_bert(), Dataset(Inputs.single(tokens()), torch.arange(48) % 3)


def _llama() -> tuple[nn.Module, Dataset]:
    return tiny_llama(layers=2), Dataset(llama_tokens(32, 12))


MODELS = {"vit": _vit, "convnext": _convnext, "bert": _bert, "llama": _llama}


def _outputs(model: nn.Module, x: Inputs) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {name: t.clone() for name, t in named_outputs(x.call(model)).items()}


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5, rtol=1e-4) for k in a)


def _check(model: nn.Module, run: Run) -> None:
    spec = run.spec
    graph = build_graph(model, spec.example)
    groups = group_candidates(spec, run.cache, model, graph)
    scoring = step_scoring(run, model, graph, groups)
    x = spec.calib[:16]
    before = _outputs(model, x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plans = [make_plan([g], [s], max(1, g.capacity // 4), spec.options.round_to) for g, s in zip(groups, scoring.scores)
             if g.capacity]
    assert len(plans) >= 2
    for plan in plans:
        pruned = copy.deepcopy(model)
        apply_plan(pruned, spec.example, plan, scoring.means)
        with applied(model, spec.example, graph, plan, scoring.means):
            assert _close(_outputs(model, x), _outputs(pruned, x)), plan
            assert run.cache.measure(model, spec.example) == run.cache.measure(pruned, spec.example)
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()), plan
        assert _close(_outputs(model, x), before)
        # torch-pruning's graph follows unwrapped parameters by identity: it must follow the model's own again
        params = {id(p) for p in model.parameters()}
        assert all(id(p) in params for p in graph._param_to_name), plan
        assert all(id(node.module) in params for node in graph.module2node.values()
                   if isinstance(node.module, nn.Parameter)), plan
    # the graph the trials used still prunes the model as a freshly traced one prunes a copy
    everything = make_plan(groups, scoring.scores, sum(g.capacity for g in groups) // 3, spec.options.round_to)
    fresh = copy.deepcopy(model)
    apply_plan(fresh, spec.example, everything, scoring.means)
    apply_plan(model, spec.example, everything, scoring.means, graph=graph)
    assert _close(_outputs(model, x), _outputs(fresh, x))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_trial_computes_what_a_pruned_copy_computes_and_leaves_the_model_as_it_was(name: str) -> None:
    model, data = MODELS[name]()
    options = CompressOptions(device="cpu", allocation="scores", calibration_samples=32)
    model, run = prepared_run(model, data, Target(params_reduction=0.5), options)
    _check(model, run)


def test_a_trial_on_a_residual_cnn(digits_model: nn.Module, digits_arrays) -> None:
    model, data = _digits(digits_model, digits_arrays)
    model, run = prepared_run(model, data, Target(params_reduction=0.5),
                              CompressOptions(device="cpu", allocation="scores", calibration_samples=32))
    _check(model, run)


def test_a_trial_that_raises_still_restores_the_model() -> None:
    model, data = _bert()
    model, run = prepared_run(model, data, Target(params_reduction=0.5),
                              CompressOptions(device="cpu", allocation="scores", calibration_samples=32))
    graph = build_graph(model, run.spec.example)
    groups = group_candidates(run.spec, run.cache, model, graph)
    x = run.spec.calib[:8]
    before = _outputs(model, x)
    plan = make_plan(groups, [torch.rand(g.width) for g in groups], sum(g.capacity for g in groups) // 2, None)
    with pytest.raises(RuntimeError), applied(model, run.spec.example, graph, plan):
        raise RuntimeError("a probe's forward failed")
    assert _close(_outputs(model, x), before)


class _TwoOutputs(nn.Module):
    """Its hidden layer is also an output: a channel cut there changes the model's interface."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(8, 16)
        self.inner = nn.Linear(16, 16)
        self.norm = nn.BatchNorm1d(16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.hidden(x)
        return self.head(torch.relu(self.norm(self.inner(h)))), h


def test_the_cut_check_tries_each_group_on_the_model_itself_and_leaves_it_as_it_was() -> None:
    model = _TwoOutputs()
    example = Inputs.single(torch.randn(4, 8))
    graph = build_graph(model, example)
    groups = prunable_groups(graph, model, [], {}, 0.125, 1)
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    verdicts = {g.key.name: survives_channel_cut(model, example, graph, g) for g in groups}
    assert verdicts == {"hidden": False, "inner": True, "head": False}
    # in eval mode while it tries, and as it was after: the norm's running statistics did not move
    assert model.training
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    # the graph it tried through still prunes the model as a freshly traced one prunes a copy
    inner = next(g for g in groups if g.key.name == "inner")
    plan = {inner.key: [0, 5]}
    fresh = copy.deepcopy(model).eval()
    apply_plan(fresh, example, plan)
    apply_plan(model.eval(), example, plan, graph=graph)
    assert _close(_outputs(model, example), _outputs(fresh, example))

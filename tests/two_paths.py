"""A two-layer toy whose layers differ in how much they reach the logits, and a run for it."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from core.data import Dataset
from core.inputs import Inputs
from core.options import CompressOptions, Target
from core.run.context import Run
from core.run.pipeline import prepared_run
from core.run.stages import group_candidates
from core.surgery.groups import PrunableGroup, build_graph


class TwoPaths(nn.Module):
    """Two hidden layers that both reach the logits: `wide` directly and through `narrow`, whose
    own path to the logits is scaled down, so its units matter little however they score."""

    def __init__(self, quiet: float = 0.02) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.wide = nn.Linear(8, 32)
        self.narrow = nn.Linear(32, 32)
        self.from_wide = nn.Linear(32, 3)
        self.from_narrow = nn.Linear(32, 3)
        with torch.no_grad():
            self.from_narrow.weight.mul_(quiet)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.wide(x))
        return self.from_wide(h) + self.from_narrow(torch.relu(self.narrow(h)))


def two_paths_run(model: nn.Module, options: CompressOptions
                  ) -> tuple[nn.Module, Run, list[PrunableGroup], tp.DependencyGraph]:
    """The model as compress holds it, its run on 256 random inputs labeled by the model itself,
    its prunable groups and dependency graph."""
    torch.manual_seed(1)
    x = torch.randn(256, 8)
    data = Dataset(Inputs.single(x), model(x).argmax(1).detach())
    model, run = prepared_run(model, data, Target(params_reduction=0.5), options)
    graph = build_graph(model, run.spec.example)
    return model, run, group_candidates(run.spec, run.cache, model, graph), graph

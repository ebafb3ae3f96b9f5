"""Drift allocation: unit scores of different groups put in one currency by measuring each group.

Divergence ranks the units of one layer well, but normalised per layer it says nothing about
how a head, an MLP neuron and a residual-stream channel compare: a layer's mean unit scores 1
however thin the layer already is and however many parameters a unit holds. Each group is
therefore probed: its lowest-scoring units are removed (with the same compensation the step would apply, on the model
itself for the moment of the probe: core.surgery.trial) and the drift of its outputs from the
model's is measured. A unit's
score becomes its share of that drift divided by its share of the size removed, so one global
ranking compares estimated drift per unit of the size target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from core.run.context import Run
from core.run.goals import Size
from core.run.prefix import PrefixCache
from core.surgery.groups import PrunableGroup
from core.surgery.plan import make_plan
from core.surgery.trial import applied
from core.surgery.units import Means, Plan
from core.tasks.base import collect

# Inputs the probes are measured on (the first calibration samples): enough to rank groups whose
# drifts differ by orders of magnitude, few enough that a probe costs about one forward pass.
PROBE_SAMPLES = 128
# Samples the probes of one step run together (each through the part of the model after its group):
# a model with more groups than PROBE_BUDGET // PROBE_SAMPLES probes each on fewer samples, so that
# the probes cost about what a few calibration passes cost instead of the depth times a pass
# (vit_b_16 has 24 groups, resnet50 37). No fewer than MIN_PROBE_SAMPLES: on EfficientNet-Lite0 a step
# planned from 64 probe inputs removes 98 % of the units one planned from 128 removes, from 32 only 96 %
# (benchmarks/probe_samples.py).
PROBE_BUDGET = 2048
MIN_PROBE_SAMPLES = 64
# What each probe removes, as a share of the size target: about one group's part of a step. Equal
# for every group, because drift grows faster than linearly with the cut, so a probe as large as
# a residual-stream channel's share of the width would overprice it against small MLP neurons.
PROBE_SHARE = 0.02
# ... and at least this share of the group's width: the probe's drift is spread over the units by
# score, and a sum of very few low scores is too small a base to scale the others by.
PROBE_WIDTH = 0.05
MIN_DRIFT = 1e-15


@dataclass
class _Probe:
    plan: Plan
    units: list[int]  # of one channel group
    cost: float  # share of the size target


def drift_per_size(run: Run, model: nn.Module, graph: tp.DependencyGraph, groups: list[PrunableGroup],
                   scores: list[torch.Tensor], means: Means) -> list[torch.Tensor]:
    """Scores in estimated drift per unit of the size target, from a probe that removes each group's
    lowest-scoring units worth PROBE_SHARE of the target, and at least PROBE_WIDTH of the group (one
    unit, or one round_to block), compensated with `means` as the step would be. A group no probe
    can cut scores infinite. `graph` is the dependency graph of `model`, which the probes leave as
    they found it."""
    x = run.spec.calib[:probe_samples(len(groups))]
    task = run.spec.task
    prefix = PrefixCache.record(model, run.spec.example, x, run.spec.device, task)
    size = run.measure(model)
    out = []
    for group, unit_scores in zip(groups, scores):
        probe = _probe(run, model, graph, size, group, unit_scores, means, math.ceil(PROBE_WIDTH * group.width))
        if probe is None:
            out.append(torch.full_like(unit_scores, math.inf))
            continue
        wanted = min(group.capacity, math.ceil(PROBE_SHARE * len(probe.units) / probe.cost))
        if wanted > len(probe.units):
            probe = _probe(run, model, graph, size, group, unit_scores, means, wanted) or probe
        with applied(model, run.spec.example, graph, probe.plan, means) as touched, prefix.skipping(touched):
            # floored, so that a probe below measurement keeps its units' order by score
            drift = max(task.drift(collect(model, x, run.spec.device, task), prefix.reference), MIN_DRIFT)
        taken = unit_scores[probe.units].clamp(min=0.0)
        # a unit's share of the probe's drift follows its score; an all-zero probe shares it evenly
        weights = unit_scores.clamp(min=0.0) + 1e-12
        per_unit = weights / (taken + 1e-12).sum() * drift
        out.append(per_unit / (probe.cost / len(probe.units)))
    return out


def probe_samples(groups: int) -> int:
    """How many inputs each of a step's `groups` probes is measured on."""
    return max(MIN_PROBE_SAMPLES, min(PROBE_SAMPLES, PROBE_BUDGET // max(groups, 1)))


def _probe(run: Run, model: nn.Module, graph: tp.DependencyGraph, size: Size, group: PrunableGroup,
           unit_scores: torch.Tensor, means: Means, n: int) -> _Probe | None:
    """The plan that removes the group's `n` lowest-scoring units (as make_plan rounds them), with its
    cost."""
    if group.capacity == 0:
        return None
    plan = make_plan([group], [unit_scores], n, run.spec.options.round_to)
    units = [i for i in plan.get(group.key, []) if i < group.width]
    if not units:
        return None
    # compensation changes no size, so the cost is measured without it
    with applied(model, run.spec.example, graph, plan):
        cost = run.spec.goals.share_of_target(size, run.measure(model))
    return _Probe(plan, units, cost) if cost > 0.0 else None


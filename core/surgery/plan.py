"""Plans: which units of which group to remove, chosen by a global ranking of their scores."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from core.importance.divergence import GroupScorer
from core.surgery.groups import PrunableGroup
from core.surgery.units import Plan


def rounded_count(width: int, selected: int, minimum: int, round_to: int | None) -> int:
    """Channels to remove so the remaining width is a multiple of `round_to` (nearest)."""
    if not round_to or selected == 0:
        return selected
    floor_width = math.ceil(minimum / round_to) * round_to
    keep = max(round_to * round((width - selected) / round_to), floor_width)
    return max(width - keep, 0)


def make_plan(groups: list[PrunableGroup], scores: list[torch.Tensor], k: int, round_to: int | None,
              caps: Sequence[int] | None = None) -> Plan:
    """Remove the `k` lowest-scoring channels across all groups (global ranking).

    Scores are already comparable across groups (normalised per group). No group goes
    below its minimum width, nor loses more than its entry in `caps` (a cap for each group, if given).
    """
    entries = [
        (float(score), g, c)
        for g, group_scores in enumerate(scores)
        for c, score in enumerate(group_scores.tolist())
    ]
    entries.sort(key=lambda e: (e[0], e[1], e[2]))
    taken = [0] * len(groups)
    limits = [group.capacity if caps is None else min(caps[g], group.capacity) for g, group in enumerate(groups)]
    chosen = 0
    for _, g, _ in entries:
        if chosen >= k:
            break
        if taken[g] < limits[g]:
            taken[g] += 1
            chosen += 1
    plan: Plan = {}
    for g, group in enumerate(groups):
        n = rounded_count(group.width, taken[g], group.min_width, round_to if group.rounds else None)
        if n == 0:
            continue
        lowest = torch.argsort(scores[g], stable=True)[:n].tolist()
        plan[group.key] = sorted(
            idx + offset * group.width for offset in range(group.ch_groups) for idx in lowest
        )
    return plan


def planned_units(plan: Plan) -> int:
    return sum(len(idxs) for idxs in plan.values())


def score_groups(groups: list[PrunableGroup], scorer: GroupScorer, normalise: bool = True) -> list[torch.Tensor]:
    """Per-channel scores for each group, averaged over channel groups, normalised by the group mean
    unless the scorer's are comparable across groups already (`normalise=False`).

    Per-group mean normalisation is what makes scores of different layers comparable
    for global ranking (method §2). A group the scorer cannot see gets uniform scores.
    """
    out = []
    for group in groups:
        raw = scorer(group.group)
        if raw is None:
            raw = torch.ones(group.width * group.ch_groups)
        raw = raw.detach().float().cpu().view(group.ch_groups, -1).mean(0)
        out.append(raw / (raw.mean() + 1e-12) if normalise else raw)
    return out

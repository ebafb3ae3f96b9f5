"""The size target as predicates on a model's size, relative to the original model's."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from core.options import Target
from core.report import BudgetResolution
from core.tasks.kinds import Metric

# The result may miss the size target by this much and still count as met (issue #2).
TARGET_TOLERANCE = 0.03
# Reductions are differences of ratios; this keeps a model exactly at a bound on the right side of it.
_EPSILON = 1e-9
# A top-1 budget is resolved by the held-out split when it is worth at least this many samples: one
# sample more or less then moves the measured drop by a third of the budget at most (issue #17).
RESOLVING_SAMPLES = 3


class Verdict(NamedTuple):
    """How a model does on the held-out split: its task's metric (`accuracy`: top-1, or agreement with the
    original's predictions when the data has no labels, for a classifier; core.tasks for the others) and
    a smooth agreement with the original (for a classifier, the mean probability it gives the original's
    predicted class, core.measure.accuracy.soft_agreement)."""

    accuracy: float
    soft_agreement: float


def budget_resolution(max_drop: float, eval_samples: int, eval_fraction: float,
                      metric: Metric = Metric.TOP1) -> BudgetResolution:
    """What `eval_samples` held-out samples can say about a budget of `max_drop` on `metric`.

    A top-1 budget worth fewer than RESOLVING_SAMPLES samples is decided by soft agreement, which has no
    such granularity, within the budget, alongside top-1 within RESOLVING_SAMPLES samples: top-1 alone
    would reject any step that flips one sample, or accept on the luck of which samples flipped. The
    other tasks' metrics average over pixels, tokens, boxes or dimensions and decide their budgets alone."""
    worth = 1.0 / max(eval_samples, 1)
    if metric not in (Metric.TOP1, Metric.TOP1_AGREEMENT):
        return BudgetResolution(eval_samples=eval_samples, sample_worth=round(worth, 6), resolved=True,
                                top1_tolerance=max_drop, decided_by=metric)
    # a budget of 0 asks for no drop at all, which any split measures
    resolved = max_drop == 0 or max_drop + _EPSILON >= RESOLVING_SAMPLES * worth
    if resolved:
        return BudgetResolution(eval_samples=eval_samples, sample_worth=round(worth, 6), resolved=True,
                                top1_tolerance=max_drop, decided_by=Metric.TOP1)
    tolerance = RESOLVING_SAMPLES * worth
    return BudgetResolution(
        eval_samples=eval_samples, sample_worth=round(worth, 6), resolved=False, top1_tolerance=round(tolerance, 6),
        decided_by="top1_and_soft_agreement",
        warning=f"The accuracy budget ({max_drop:.2%} top-1) is finer than the held-out split can measure: "
                f"{eval_samples} held-out samples decide it, and one sample is worth {worth:.2%}. Steps are judged "
                f"by soft agreement with the original model (the mean probability of its predicted class) within "
                f"{max_drop:.2%}, and by top-1 within {RESOLVING_SAMPLES} samples ({tolerance:.2%}). For a top-1 "
                f"budget of {max_drop:.2%} itself, bring at least {_samples_for(max_drop, eval_fraction)} samples.")


def _samples_for(max_drop: float, eval_fraction: float) -> int:
    """The data samples whose held-out share resolves a budget of `max_drop` (> 0)."""
    return math.ceil(math.ceil(RESOLVING_SAMPLES / max_drop - _EPSILON) / eval_fraction - _EPSILON)


class Size(NamedTuple):
    """A model's MACs (for one sample) and parameter count; a tuple, so it unpacks as (macs, params)."""

    macs: int
    params: int


def reductions(size: Size, original: Size) -> dict[str, float]:
    """The fractions of the original's MACs and params that `size` removes."""
    return {"macs": 1.0 - size.macs / original.macs, "params": 1.0 - size.params / original.params}


@dataclass(frozen=True)
class Goals:
    """What a run aims for: the target's size reductions and quality budget (`target` with its budget set
    for the task), against the original model's size and its metric on the evaluation split."""

    target: Target
    original: Size
    accuracy: float  # the original's value of `metric`
    soft_agreement: float  # the original's own (for a classifier, its mean top probability)
    resolution: BudgetResolution
    metric: Metric = Metric.TOP1

    def drop(self, verdict: Verdict) -> float:
        """How much worse than the original `verdict` is, in the budget's units."""
        return self.metric.drop(self.accuracy, verdict.accuracy)

    @property
    def fractions(self) -> dict[str, float]:
        """The reductions the target asks for, by measure ("macs", "params"); only the ones it names."""
        asked = {"macs": self.target.macs_reduction, "params": self.target.params_reduction}
        return {key: value for key, value in asked.items() if value is not None}

    def reductions(self, size: Size) -> dict[str, float]:
        return reductions(size, self.original)

    def reached(self, size: Size, share: float = 1.0) -> bool:
        """Whether `size` removes at least `share` of every reduction the target asks for."""
        got = self.reductions(size)
        return all(got[key] >= share * goal - _EPSILON for key, goal in self.fractions.items())

    def met(self, size: Size) -> bool:
        """Whether `size` reaches the target within TARGET_TOLERANCE."""
        got = self.reductions(size)
        return all(got[key] >= goal - TARGET_TOLERANCE for key, goal in self.fractions.items())

    def overshoots(self, size: Size) -> bool:
        """Whether `size` removes more than TARGET_TOLERANCE past any reduction the target asks for."""
        got = self.reductions(size)
        return any(got[key] > goal + TARGET_TOLERANCE for key, goal in self.fractions.items())

    def progress(self, size: Size) -> float:
        """How far `size` is towards the target (0 to 1): the least advanced measure counts."""
        got = self.reductions(size)
        return min(min(got[key] / goal, 1.0) for key, goal in self.fractions.items())

    def no_larger(self, size: Size, than: Size) -> bool:
        """Whether `size` is at most as large as `than` in every measure the target names."""
        got, bound = self.reductions(size), self.reductions(than)
        return all(got[key] >= bound[key] - _EPSILON for key in self.fractions)

    def share_of_target(self, before: Size, after: Size) -> float:
        """How much of the size target going from `before` to `after` achieves (1.0 = all)."""
        start, end = self.reductions(before), self.reductions(after)
        return sum((end[key] - start[key]) / goal for key, goal in self.fractions.items())

    def within_budget(self, verdict: Verdict) -> bool:
        """Whether `verdict` is inside the budget: the metric at most max_accuracy_drop worse than the
        original's; where the held-out split cannot resolve a top-1 budget (see budget_resolution), soft
        agreement at most max_accuracy_drop below and top-1 within the resolution's tolerance."""
        within = self.drop(verdict) <= self.resolution.top1_tolerance + _EPSILON
        if self.resolution.resolved:
            return within
        return within and self.soft_agreement - verdict.soft_agreement <= self.target.budget + _EPSILON

    def better(self, verdict: Verdict, than: Verdict) -> bool:
        """Whether `verdict` is at least as good as `than` by the measure that decides the budget."""
        if self.resolution.resolved:
            return self.drop(verdict) <= self.drop(than)
        return verdict.soft_agreement >= than.soft_agreement

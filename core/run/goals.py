"""The size target as predicates on a model's size, relative to the original model's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from core.options import Target

# The result may miss the size target by this much and still count as met (issue #2).
TARGET_TOLERANCE = 0.03
# Reductions are differences of ratios; this keeps a model exactly at a bound on the right side of it.
_EPSILON = 1e-9


class Size(NamedTuple):
    """A model's MACs (for one sample) and parameter count; a tuple, so it unpacks as (macs, params)."""

    macs: int
    params: int


def reductions(size: Size, original: Size) -> dict[str, float]:
    """The fractions of the original's MACs and params that `size` removes."""
    return {"macs": 1.0 - size.macs / original.macs, "params": 1.0 - size.params / original.params}


@dataclass(frozen=True)
class Goals:
    """What a run aims for: the target's size reductions and accuracy budget, against the original
    model's size and its accuracy on the evaluation split."""

    target: Target
    original: Size
    accuracy: float

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

    def within_budget(self, accuracy: float) -> bool:
        """Whether `accuracy` is at most the target's max_accuracy_drop below the original's."""
        return self.accuracy - accuracy <= self.target.max_accuracy_drop + _EPSILON

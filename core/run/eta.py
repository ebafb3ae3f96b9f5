"""How long a run takes: the steps its schedule needs, and the time to go from what it has measured.

The preflight (core.run.preflight) and a running job (Run.update_eta) use the same count: Stage 1
steps from the schedule until the target, each step costing what a measured step costs, then the
final recovery's iterations at the measured iteration time, then the export.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from core.options import CompressOptions, Stage

# Halving a rejected step (CompressOptions.min_step_fraction) retries it: the estimate's upper end
# allows this many retries, and this many more steps at the smaller sizes that follow.
BACKOFF_ALLOWANCE = 3


# How a model's size follows the width Stage 1 keeps: size ~ kept ** exponent. 2 when both sides of
# every layer shrink alike; a real model's is lower (its input and output layers keep one side, and the
# units go first where they cost least), so the preflight measures it on its own step.
SQUARE = 2.0
_EXPONENT_RANGE = (0.25, SQUARE)


def size_exponent(units: float, reduction: float) -> float:
    """The exponent of a step that removed `units` of the prunable width and `reduction` of the size
    (MACs or params, as the target counts them), within _EXPONENT_RANGE."""
    if not 0.0 < units < 1.0 or not 0.0 < reduction < 1.0:
        return SQUARE
    low, high = _EXPONENT_RANGE
    return min(max(math.log(1.0 - reduction) / math.log(1.0 - units), low), high)


def schedule_steps(opts: CompressOptions, goal: float, reached: float = 0.0, t0: int = 0,
                   scale: float = 1.0, exponent: float = SQUARE) -> int:
    """Stage 1 steps from schedule position `t0` (steps at `scale` of the schedule's size) that take the
    reduction from `reached` to `goal`, taking the size to fall with the kept width to the power
    `exponent`; at most the steps the schedule has left."""
    kept = max(1.0 - reached, 0.0) ** (1.0 / exponent)
    steps = 0
    for t in range(t0, opts.max_steps):
        if 1.0 - kept**exponent >= goal - 1e-9:
            break
        kept *= 1.0 - min(opts.p0 * (1 + t / opts.max_steps) ** opts.alpha * scale, 1.0)
        steps += 1
    return steps


def target_goal(opts: CompressOptions, goal: float, blocks: int) -> float:
    """The reduction Stage 1 is counted to: all of `goal`, less Stage 2's share when `blocks` can go."""
    return goal * (opts.filter_share if Stage.LAYERS in opts.stages and blocks else 1.0)


@dataclass
class Clock:
    """What a run has measured so far, for its time to go."""

    step_s: list[float] = field(default_factory=list)  # every recorded step, accepted or not
    iteration_s: list[float] = field(default_factory=list)  # one recovery iteration, per recovery
    export_s: float = 0.0  # the original's ONNX export, check and latency, which the end repeats
    eval_s: float = 0.0  # one pass over the held-out split

    def remaining(self, steps: int, final_iterations: int) -> float | None:
        """Seconds to go with `steps` more steps, the final recovery and the export; None before any step."""
        if not self.step_s:
            return None
        iteration = statistics.median(self.iteration_s) if self.iteration_s else 0.0
        return steps * statistics.mean(self.step_s) + final_iterations * iteration + 2 * self.eval_s + self.export_s

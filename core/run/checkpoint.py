"""A run saved at an accepted step, and resumed from there: what lets a service move a job whose
process died to another process without redoing the steps it had accepted.

A checkpoint is taken after every accepted step (Stage 1's pruning steps, Stage 2's block
removals). It holds the accepted model as a whole module (its shapes are no longer the original's,
so a state dict alone cannot be loaded into a fresh copy), the stages' state, the phase of the stage
sequence the step belongs to and why the phases before it stopped, Stage 2's blocks found not
removable, the memos whose values depend on the model they were first computed on, the RNG state
and the time already spent. Everything before the stages (the data split, the baseline, the
original model's accuracy) is deterministic and is computed again on resume.

The file is written with `torch.save` of a pickled module, so it must only ever be loaded from a
store the caller trusts (a service keeps its digest beside the job and checks it before loading).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

import torch
from torch import nn

from core.options import CompressOptions, Target
from core.report import StopReason
from core.run.context import AcceptFn, RunCache, StageState
from core.surgery.units import UnitKey

FORMAT = 1


class Phase(IntEnum):
    """The stage sequence of a run (core.run.pipeline._run_stages), in order."""

    FILTERS = 0  # Stage 1 up to its share of the target
    LAYERS = 1  # Stage 2
    CLOSE_GAP = 2  # Stage 1 again, for what Stage 2 left


@dataclass(frozen=True)
class Checkpoint:
    options: CompressOptions  # as the run used them (after core.run.pipeline._prepare): a resume must match
    target: Target
    phase: Phase
    reasons: tuple[StopReason, ...]  # why the phases before `phase` stopped
    state: StageState
    essential: frozenset[str]  # Stage 2's blocks found not removable in this phase so far
    original_widths: dict[UnitKey, int]
    cuttable: dict[UnitKey, bool]
    elapsed: float  # seconds of the run so far, counted against the time budget on resume
    rng: torch.Tensor = field(repr=False)
    model: nn.Module = field(repr=False)

    @property
    def steps(self) -> int:
        """The steps recorded so far (accepted and rolled back), which a resumed run does not repeat."""
        return len(self.state.steps)

    def matches(self, options: CompressOptions, target: Target) -> bool:
        return self.options == options and self.target == target


CheckpointFn = Callable[[Checkpoint], None]


@dataclass
class Saver:
    """Turns the stages' accepted steps into checkpoints handed to the caller's `save`."""

    save: CheckpointFn
    options: CompressOptions
    target: Target
    cache: RunCache
    started: float  # time.monotonic() the run's time budget is counted from

    def at(self, phase: Phase, reasons: tuple[StopReason, ...]) -> AcceptFn:
        def accepted(model: nn.Module, state: StageState, essential: frozenset[str] = frozenset()) -> None:
            self.save(Checkpoint(
                options=self.options, target=self.target, phase=phase, reasons=reasons, state=state,
                essential=essential, original_widths=dict(self.cache.original_widths),
                cuttable=dict(self.cache.cuttable), elapsed=time.monotonic() - self.started,
                rng=torch.get_rng_state(), model=model))

        return accepted


def save_checkpoint(checkpoint: Checkpoint, path: Path) -> Path:
    """Write `checkpoint` to `path` (through a temporary file beside it) and return `path`."""
    partial = path.with_name(path.name + ".partial")
    torch.save({"format": FORMAT, "checkpoint": checkpoint}, partial)
    partial.replace(path)
    return path


def load_checkpoint(path: Path) -> Checkpoint:
    """A checkpoint written by `save_checkpoint`; ValueError when the file is not one this version reads.

    Unpickles: only for files from a trusted store (see the module docstring). Loaded on the CPU;
    the run moves the model to its device."""
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(saved, dict) or saved.get("format") != FORMAT or not isinstance(
            saved.get("checkpoint"), Checkpoint):
        raise ValueError("not a checkpoint of this version")
    return saved["checkpoint"]

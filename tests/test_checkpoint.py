"""Checkpoints (core.run.checkpoint): a run resumed from the checkpoint of an accepted step goes on
from that step, in Stage 1 and in Stage 2, and ends where the uninterrupted run ended."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from core.data import Dataset
from core.inputs import Inputs
from core.options import CompressOptions, Stage, Target
from core.run.checkpoint import Checkpoint, Phase, load_checkpoint, save_checkpoint
from core.run.pipeline import compress

FAST = dict(recovery_iterations=5, final_recovery_iterations=5, latency_runs=1, max_steps=6)


def _data(arrays: tuple[np.ndarray, np.ndarray]) -> Dataset:
    x, y = arrays
    return Dataset(Inputs.single(torch.from_numpy(x)), torch.from_numpy(y))


def _sizes(report) -> list[tuple[str, int, int, bool]]:
    return [(step.stage, step.macs, step.params, step.accepted) for step in report.steps]


@pytest.mark.parametrize(("stages", "phase"), [(("filters",), Phase.FILTERS), (("layers",), Phase.LAYERS)])
def test_a_resumed_run_goes_on_from_its_checkpoint(digits_model, digits_arrays, tmp_path: Path,
                                                    stages: tuple[str, ...], phase: Phase) -> None:
    target = Target(macs_reduction=0.6 if stages == ("filters",) else 0.5, max_accuracy_drop=1.0)
    options = CompressOptions(stages=tuple(Stage(s) for s in stages), **FAST)
    saved: list[Path] = []

    def keep(checkpoint: Checkpoint) -> None:
        saved.append(save_checkpoint(checkpoint, tmp_path / f"checkpoint-{len(saved)}.pt"))

    whole = compress(digits_model, _data(digits_arrays), target, options, tmp_path / "whole", checkpoint=keep)
    assert len(saved) >= 2, whole.report.steps
    assert whole.report.resumed_at_step is None

    first = load_checkpoint(saved[0])
    assert first.phase == phase and first.steps >= 1 and first.state.steps[-1].accepted
    events = []
    resumed = compress(digits_model, _data(digits_arrays), target, options, tmp_path / "resumed",
                       progress=events.append, resume=first)
    assert resumed.report.resumed_at_step == first.steps
    assert f"Resumed from a checkpoint taken after step {first.steps}." in resumed.report.notes
    # the steps up to the checkpoint are not run again; the rest reach the same models
    run_again = {event.step for event in events if event.stage in stages}
    assert run_again and min(run_again) == first.steps + 1
    assert _sizes(resumed.report) == _sizes(whole.report)
    assert (resumed.report.macs_after, resumed.report.params_after) == (whole.report.macs_after,
                                                                        whole.report.params_after)


def test_a_checkpoint_of_other_options_is_not_used(digits_model, digits_arrays, tmp_path: Path) -> None:
    target = Target(macs_reduction=0.5, max_accuracy_drop=1.0)
    options = CompressOptions(stages=(Stage.FILTERS,), **FAST)
    saved: list[Checkpoint] = []
    compress(digits_model, _data(digits_arrays), target, options, tmp_path / "a", checkpoint=saved.append)
    other = compress(digits_model, _data(digits_arrays), target, CompressOptions(stages=(Stage.FILTERS,), seed=1,
                     **FAST), tmp_path / "b", resume=saved[0])
    assert other.report.resumed_at_step is None
    assert any("started over" in note for note in other.report.notes)


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.pt"
    torch.save({"format": 1, "checkpoint": "something else"}, path)
    with pytest.raises(ValueError, match="not a checkpoint"):
        load_checkpoint(path)


def test_a_run_of_both_stages_resumes_in_a_later_phase(digits_model, digits_arrays, tmp_path: Path) -> None:
    """Stage 1 to its share, Stage 2, Stage 1 again: a checkpoint past the first phase carries why
    the phases before it stopped, and the resumed run skips them."""
    target = Target(macs_reduction=0.5, max_accuracy_drop=1.0)
    options = CompressOptions(layers_must_beat_width=False, **FAST)
    saved: list[Checkpoint] = []
    whole = compress(digits_model, _data(digits_arrays), target, options, tmp_path / "whole", checkpoint=saved.append)
    later = [checkpoint for checkpoint in saved if checkpoint.phase > Phase.FILTERS]
    assert later, whole.report.steps
    resume = later[0]
    assert len(resume.reasons) == resume.phase
    events = []
    resumed = compress(digits_model, _data(digits_arrays), target, options, tmp_path / "resumed",
                       progress=events.append, resume=resume)
    assert _sizes(resumed.report) == _sizes(whole.report)
    assert resumed.report.stop_reason == whole.report.stop_reason
    assert min(event.step for event in events if event.stage in ("filters", "layers")) == resume.steps + 1

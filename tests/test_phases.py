"""The phase timer's accounting: nested work is counted where it is nested, once."""

from __future__ import annotations

import pytest

from core.report import Work
from core.run import phases
from core.run.phases import PhaseTimer


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(phases.time, "monotonic", fake)
    return fake


def test_nested_work_pauses_the_work_it_is_nested_in(clock: _Clock) -> None:
    timer = PhaseTimer()
    with timer(Work.SCORING):
        clock.now += 2.0
        with timer(Work.PROBES):
            clock.now += 5.0
        clock.now += 1.0
    with timer(Work.RECOVERY):
        clock.now += 4.0
    with timer(Work.SCORING):
        clock.now += 0.5
    assert timer.seconds == {Work.SCORING: 3.5, Work.PROBES: 5.0, Work.RECOVERY: 4.0}


def test_costs_come_in_the_order_of_the_work_and_only_for_work_done(clock: _Clock) -> None:
    timer = PhaseTimer()
    with timer(Work.EXPORT):
        clock.now += 1.0
    with timer(Work.CALIBRATION):
        clock.now += 0.25
    costs = timer.costs()
    assert [(c.work, c.seconds, c.peak_gpu_mb) for c in costs] == [
        (Work.CALIBRATION, 0.25, None), (Work.EXPORT, 1.0, None)]


def test_a_phase_that_raises_is_still_counted(clock: _Clock) -> None:
    timer = PhaseTimer()
    with pytest.raises(RuntimeError), timer(Work.RECOVERY):
        clock.now += 3.0
        raise RuntimeError("cancelled")
    with timer(Work.EVALUATION):
        clock.now += 1.0
    assert timer.seconds == {Work.RECOVERY: 3.0, Work.EVALUATION: 1.0}

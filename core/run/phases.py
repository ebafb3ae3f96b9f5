"""Where a run's time and memory go: wall time, peak accelerator memory and peak resident memory by
kind of work, so that cost can be compared across model sizes, data sizes and versions
(benchmarks/scale.py) and a user sees what a job spent its time on (report.json `phases`)."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from core.report import PhaseCost, Work


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class _Open:
    work: Work
    since: float
    peak_gpu: int = 0


@dataclass
class PhaseTimer:
    """Accumulates time by kind of work. Phases nest: entering one pauses the phase it is entered
    from, so the totals add up to the time spent inside any phase."""

    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    seconds: dict[Work, float] = field(default_factory=dict)
    peak_gpu: dict[Work, int] = field(default_factory=dict)
    _stack: list[_Open] = field(default_factory=list)

    @property
    def _cuda(self) -> bool:
        return self.device.type == "cuda"

    @contextmanager
    def __call__(self, work: Work) -> Iterator[None]:
        now = time.monotonic()
        if self._stack:
            self._pause(self._stack[-1], now)
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        self._stack.append(_Open(work, now))
        try:
            yield
        finally:
            done = self._stack.pop()
            now = time.monotonic()
            self._pause(done, now)
            if self._stack:
                parent = self._stack[-1]
                parent.since = now
                # the parent's peak includes what its nested phases allocated
                parent.peak_gpu = max(parent.peak_gpu, done.peak_gpu)
                if self._cuda:
                    torch.cuda.reset_peak_memory_stats(self.device)

    def _pause(self, phase: _Open, now: float) -> None:
        self.seconds[phase.work] = self.seconds.get(phase.work, 0.0) + now - phase.since
        if self._cuda:
            phase.peak_gpu = max(phase.peak_gpu, torch.cuda.max_memory_allocated(self.device))
            self.peak_gpu[phase.work] = max(self.peak_gpu.get(phase.work, 0), phase.peak_gpu)

    def costs(self) -> list[PhaseCost]:
        """Every kind of work that ran, in Work's order."""
        return [PhaseCost(work=work, seconds=round(self.seconds[work], 3),
                          peak_gpu_mb=round(self.peak_gpu[work] / 2**20, 1) if work in self.peak_gpu else None)
                for work in Work if work in self.seconds]

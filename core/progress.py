"""Progress reporting and cooperative cancellation for long runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.errors import Cancelled


@dataclass(frozen=True)
class ProgressEvent:
    stage: str  # "baseline" | "filters" | "layers" | "recovery" | "export" | "done"
    step: int
    total: int
    fraction: float  # 0..1 over the whole run
    message: str
    metrics: dict[str, Any] = field(default_factory=dict)
    elapsed_s: float | None = None  # since the run started
    eta_s: float | None = None  # expected seconds to go; None until the run has measured enough to say


ProgressFn = Callable[[ProgressEvent], None]
CancelFn = Callable[[], bool]


class Reporter:
    """Bundles the caller's callbacks so the stages need not pass two functions around."""

    def __init__(self, progress: ProgressFn | None, should_cancel: CancelFn | None) -> None:
        self._progress = progress
        self._should_cancel = should_cancel
        self._fraction = 0.0
        self._started = time.monotonic()
        self._eta: tuple[float, float] | None = None  # (seconds to go, when that was said)

    def set_eta(self, seconds: float) -> None:
        """The run's latest estimate of its time to go; events count it down until the next one."""
        self._eta = (max(seconds, 0.0), time.monotonic())

    def emit(self, stage: str, step: int, total: int, fraction: float | None, message: str,
             **metrics: Any) -> None:
        """Report progress; `fraction` None keeps the last one, and it never goes backwards."""
        if fraction is not None:
            self._fraction = max(self._fraction, min(fraction, 1.0))
        if self._progress is not None:
            now = time.monotonic()
            eta = None if self._eta is None else round(max(self._eta[0] - (now - self._eta[1]), 0.0), 1)
            self._progress(ProgressEvent(stage, step, total, self._fraction, message, metrics,
                                         elapsed_s=round(now - self._started, 1), eta_s=eta))

    def check_cancel(self) -> None:
        if self._should_cancel is not None and self._should_cancel():
            raise Cancelled("Cancelled by the caller.")

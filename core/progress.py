"""Progress reporting and cooperative cancellation for long runs."""

from __future__ import annotations

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


ProgressFn = Callable[[ProgressEvent], None]
CancelFn = Callable[[], bool]


class Reporter:
    """Bundles the caller's callbacks so the stages need not pass two functions around."""

    def __init__(self, progress: ProgressFn | None, should_cancel: CancelFn | None) -> None:
        self._progress = progress
        self._should_cancel = should_cancel
        self._fraction = 0.0

    def emit(self, stage: str, step: int, total: int, fraction: float | None, message: str,
             **metrics: Any) -> None:
        """Report progress; `fraction` None keeps the last one, and it never goes backwards."""
        if fraction is not None:
            self._fraction = max(self._fraction, min(fraction, 1.0))
        if self._progress is not None:
            self._progress(ProgressEvent(stage, step, total, self._fraction, message, metrics))

    def check_cancel(self) -> None:
        if self._should_cancel is not None and self._should_cancel():
            raise Cancelled("Cancelled by the caller.")

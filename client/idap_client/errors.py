"""What the client raises. Every exception is an `IdapError`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from idap_client.models import JobInfo


class IdapError(Exception):
    """Base class of the client's errors."""


class ApiError(IdapError):
    """The server refused a request or failed it: `status` is the HTTP status, `code`, `message` and
    `hint` come from the body's `{"error": {...}}` (or describe a body that is not one)."""

    def __init__(self, status: int, code: str, message: str, hint: str | None = None) -> None:
        super().__init__(f"{message} {hint}" if hint else message)
        self.status, self.code, self.message, self.hint = status, code, message, hint


class ServerUnavailable(IdapError):
    """Connection errors, 429 or 503 went on after every retry."""


class JobFailed(IdapError):
    """The job ended failed or cancelled; `job` is its last state (its `error` says why)."""

    def __init__(self, job: JobInfo) -> None:
        if job.error is not None:
            text = f"job {job.id} {job.status}: {job.error.message}"
            if job.error.hint:
                text += f" {job.error.hint}"
        else:
            text = f"job {job.id} {job.status}"
        super().__init__(text)
        self.job = job


class WaitTimeout(IdapError, TimeoutError):
    """`Job.wait(timeout=...)` ran out before the job finished; `job` is its last state."""

    def __init__(self, job: JobInfo, timeout: float) -> None:
        super().__init__(f"job {job.id} still {job.status} after {timeout:g} s")
        self.job = job


class ChecksumMismatch(IdapError):
    """A downloaded artifact's size or SHA-256 differs from what the job lists."""

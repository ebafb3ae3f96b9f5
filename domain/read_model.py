"""What a job looks like from outside: the body the API serves and the worker's webhooks carry."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, field_validator

from core.report import ReportHeadline
from domain.clock import aware
from domain.models import Job
from domain.redact import without_paths
from domain.states import JobStatus


class ProgressOut(BaseModel):
    stage: str | None = None
    step: int = 0
    total_steps: int = 0
    fraction: float = 0.0
    message: str | None = None
    elapsed_s: float | None = None  # since the run started
    eta_s: float | None = None  # expected seconds to go, from the steps measured so far


class ErrorOut(BaseModel):
    code: str
    message: str
    hint: str | None = None

    @field_validator("message", "hint")
    @classmethod
    def _no_paths(cls, value: str | None) -> str | None:
        return None if value is None else without_paths(value)


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str
    url: str


class JobOut(BaseModel):
    id: str
    name: str  # the config's name, else the uploaded model file's name
    status: JobStatus
    queue: str
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    progress: ProgressOut
    error: ErrorOut | None
    metrics: ReportHeadline | None  # the report's headline numbers, once the job succeeded
    artifacts: list[ArtifactOut]
    config: dict[str, Any]

    @field_validator("created_at", "updated_at", "started_at", "finished_at")
    @classmethod
    def _utc(cls, value: datetime | None) -> datetime | None:
        return aware(value)


UNRECORDED_BLOCK = "(name not recorded)"


def _headline(stored: dict[str, Any]) -> ReportHeadline:
    """A job's stored metrics. Jobs that finished before the headline kept the removed blocks' names
    stored their count: each of those blocks reads as UNRECORDED_BLOCK (the names are in report.json)."""
    if isinstance(stored.get("removed_blocks"), int):
        stored = stored | {"removed_blocks": [UNRECORDED_BLOCK] * stored["removed_blocks"]}
    return ReportHeadline.model_validate(stored)


def job_out(job: Job, base_url: str) -> JobOut:
    """`base_url` makes the artifact URLs absolute (the API's request URL, or the public URL in webhooks)."""
    base = base_url.rstrip("/")
    return JobOut(
        id=job.id, name=job.config.get("name") or job.model_filename or job.id[:8],
        status=JobStatus(job.status), queue=job.queue, created_at=job.created_at,
        updated_at=job.updated_at, started_at=job.started_at, finished_at=job.finished_at, attempts=job.attempts,
        max_attempts=job.max_attempts, cancel_requested=job.cancel_requested,
        progress=ProgressOut(**(job.progress or {})), config=job.config,
        metrics=_headline(job.metrics) if job.metrics else None,
        error=ErrorOut.model_validate(job.error) if job.error else None,
        artifacts=[ArtifactOut(name=a.name, size=a.size, sha256=a.sha256,
                               url=f"{base}/v1/jobs/{job.id}/artifacts/{a.name}") for a in job.artifacts],
    )

"""The job state machine: every status change goes through `transition`.

A change is one conditional UPDATE (`... WHERE status IN (allowed sources)`), so an API cancel
and a worker finishing the same job cannot both win, whichever process runs first.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from domain.clock import utcnow
from domain.db import rows_changed
from domain.models import Job, JobEvent


class JobStatus(StrEnum):
    # The values are what the jobs.status column stores.
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED})

# running -> queued: an infrastructure error, or a worker that stopped heartbeating, sends the
# job back for another attempt (the attempt counter decides whether there is one).
ALLOWED: dict[JobStatus, frozenset[JobStatus]] = {
    JobStatus.QUEUED: frozenset({JobStatus.RUNNING, JobStatus.CANCELLED, JobStatus.FAILED}),
    JobStatus.RUNNING: frozenset({JobStatus.QUEUED, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED}),
    JobStatus.SUCCEEDED: frozenset(),
    JobStatus.FAILED: frozenset(),
    JobStatus.CANCELLED: frozenset(),
}


def sources(target: JobStatus) -> list[JobStatus]:
    return [source for source, targets in ALLOWED.items() if target in targets]


def transition(session: Session, job_id: str, target: JobStatus, *, only_from: set[JobStatus] | None = None,
               where: Any = None, **fields: Any) -> bool:
    """Move the job to `target` if the machine allows it from its current status; commit and log it.

    `only_from` narrows the allowed sources, `where` adds a condition (e.g. a stale heartbeat).
    Returns False, changing nothing, when the job is not in an allowed status.
    """
    allowed = sources(target)
    if only_from is not None:
        allowed = [status for status in allowed if status in only_from]
    now: datetime = utcnow()
    values: dict[str, Any] = {"status": target.value, "updated_at": now, **fields}
    if target in TERMINAL:
        values.setdefault("finished_at", now)
    statement = update(Job).where(Job.id == job_id, Job.status.in_(allowed))
    if where is not None:
        statement = statement.where(where)
    if not rows_changed(session, statement.values(**values).execution_options(synchronize_session=False)):
        session.rollback()
        return False
    event = {"status": target.value} | ({"error": fields["error"]} if fields.get("error") else {})
    session.add(JobEvent(job_id=job_id, kind="status", data=event, created_at=now))
    session.commit()
    return True

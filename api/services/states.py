"""The job state machine: every status change goes through `transition`.

A change is one conditional UPDATE (`... WHERE status IN (allowed sources)`), so an API cancel
and a worker finishing the same job cannot both win, whichever process runs first.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from api.models import Job, JobEvent, utcnow

QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
STATUSES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED)
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})

# running -> queued: an infrastructure error, or a worker that stopped heartbeating, sends the
# job back for another attempt (the attempt counter decides whether there is one).
ALLOWED: dict[str, frozenset[str]] = {
    QUEUED: frozenset({RUNNING, CANCELLED, FAILED}),
    RUNNING: frozenset({QUEUED, SUCCEEDED, FAILED, CANCELLED}),
    SUCCEEDED: frozenset(),
    FAILED: frozenset(),
    CANCELLED: frozenset(),
}


def sources(target: str) -> list[str]:
    return [source for source, targets in ALLOWED.items() if target in targets]


def transition(session: Session, job_id: str, target: str, *, only_from: set[str] | None = None,
               where: Any = None, **fields: Any) -> bool:
    """Move the job to `target` if the machine allows it from its current status; commit and log it.

    `only_from` narrows the allowed sources, `where` adds a condition (e.g. a stale heartbeat).
    Returns False, changing nothing, when the job is not in an allowed status.
    """
    allowed = sources(target)
    if only_from is not None:
        allowed = [status for status in allowed if status in only_from]
    now: datetime = utcnow()
    values: dict[str, Any] = {"status": target, "updated_at": now, **fields}
    if target in TERMINAL:
        values.setdefault("finished_at", now)
    statement = update(Job).where(Job.id == job_id, Job.status.in_(allowed))
    if where is not None:
        statement = statement.where(where)
    changed = session.execute(statement.values(**values).execution_options(synchronize_session=False)).rowcount
    if not changed:
        session.rollback()
        return False
    event = {"status": target} | ({"error": fields["error"]} if fields.get("error") else {})
    session.add(JobEvent(job_id=job_id, kind="status", data=event, created_at=now))
    session.commit()
    return True

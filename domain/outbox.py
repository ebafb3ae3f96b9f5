"""The hand-off from a committed job to the broker: a transactional outbox.

A job and its `JobDispatch` row are written in one transaction; the broker is told afterwards,
by a relay that publishes due rows and deletes each once the broker took its message. So the
jobs that exist and what the API answered always agree, whatever the broker does: a broker
outage leaves `queued` jobs with their rows, which are sent when it is back. A message sent
twice is harmless (a worker claims a queued job once, `worker.runner.claim`); a message lost is
not, so a row goes only after its publish succeeded.

No database connection is held while publishing: a row is taken by pushing its due time past a
lease (a conditional UPDATE, so two relays never both take it), published, then deleted, each
step in its own short transaction. A relay that dies holding a row leaves it due again once the
lease is over.
"""

from __future__ import annotations

import logging
import threading
from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from domain.clock import utcnow
from domain.db import rows_changed, session_scope
from domain.models import Job, JobDispatch
from domain.queue import JobQueue
from domain.states import JobStatus

log = logging.getLogger(__name__)

LEASE = timedelta(seconds=60)
BATCH = 100


def add(session: Session, job_id: str, queue: str) -> None:
    """Record, in the caller's transaction, that `job_id` is to be sent to `queue`."""
    session.add(JobDispatch(job_id=job_id, queue=queue, due_at=utcnow()))


def dispatch_due(database: str, queue: JobQueue, retry_after: timedelta) -> int:
    """Publish the jobs whose dispatch is due, at most `BATCH`; at the first broker failure the row
    is put off by `retry_after` and the round ends (the broker is down for the others too).
    Returns how many rows were settled (published, or dropped for a job no longer queued)."""
    now = utcnow()
    with session_scope(database) as session:
        due = session.execute(select(JobDispatch.job_id, JobDispatch.queue, Job.status)
                              .join(Job, Job.id == JobDispatch.job_id).where(JobDispatch.due_at <= now)
                              .order_by(JobDispatch.due_at).limit(BATCH)).all()
    settled = 0
    for job_id, job_queue, status in due:
        if status == JobStatus.QUEUED:
            if not _take(database, job_id, now):
                continue  # another relay has it
            try:
                queue.enqueue_job(job_id, job_queue)
            except Exception as exc:  # kombu raises many connection error types; all mean: not sent
                _put_off(database, job_id, retry_after, exc)
                log.warning("job %s not sent to the broker, retrying in %s s: %s", job_id,
                            retry_after.total_seconds(), exc)
                return settled
        # published, or a job cancelled (or taken by a worker from an earlier message) before it was sent
        with session_scope(database) as session:
            session.execute(delete(JobDispatch).where(JobDispatch.job_id == job_id))
        settled += 1
    return settled


def _take(database: str, job_id: str, now: datetime) -> bool:
    with session_scope(database) as session:
        return bool(rows_changed(session, update(JobDispatch)
                                 .where(JobDispatch.job_id == job_id, JobDispatch.due_at <= now)
                                 .values(due_at=utcnow() + LEASE)))


def _put_off(database: str, job_id: str, retry_after: timedelta, exc: Exception) -> None:
    with session_scope(database) as session:
        session.execute(update(JobDispatch).where(JobDispatch.job_id == job_id).values(
            due_at=utcnow() + retry_after, tries=JobDispatch.tries + 1,
            last_error=f"{exc.__class__.__name__}: {exc}"[:2000]))


class Relay:
    """A thread that dispatches due jobs when woken (a job was just committed) and every
    `interval_s` (retries after a broker failure, rows of a relay that died)."""

    def __init__(self, database: str, queue: JobQueue, interval_s: float) -> None:
        self.database, self.queue, self.interval_s = database, queue, interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="idap-dispatch", daemon=True)

    def start(self) -> Relay:
        self._thread.start()
        return self

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        retry_after = timedelta(seconds=self.interval_s)
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            try:
                while not self._stop.is_set() and dispatch_due(self.database, self.queue, retry_after) >= BATCH:
                    pass
            except Exception:  # a database blip: the next round tries again
                log.exception("dispatching queued jobs failed")

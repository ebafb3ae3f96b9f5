"""What a running job writes back: throttled progress, a heartbeat, and the cancel flag it reads.

The heartbeat runs on its own thread, so a long step with no progress event still proves the
worker is alive, and `should_cancel` costs core nothing (it reads a flag the heartbeat set).
"""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update

from core import ProgressEvent
from domain import states
from domain.clock import utcnow
from domain.db import rows_changed, session_scope
from domain.models import Job, JobEvent
from domain.queue import JobQueue
from domain.settings import Settings
from domain.states import JobStatus

log = logging.getLogger(__name__)


class Lease:
    """One attempt's hold on its job: the row's attempt counter names the attempt that holds it. An
    attempt taken over by another (its heartbeats were late, the reaper gave the job to another
    worker) finds a higher counter, sets `lost` and stops at the next cancellation check."""

    def __init__(self, settings: Settings, job_id: str, attempt: int) -> None:
        self.settings, self.job_id, self.attempt = settings, job_id, attempt
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"heartbeat-{job_id}", daemon=True)
        self._last_write = 0.0
        self._last_stage: str | None = None

    def __enter__(self) -> Lease:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _beat(self) -> None:
        while not self._stop.wait(self.settings.heartbeat_interval_s):
            try:
                with session_scope(self.settings.database) as session:
                    session.execute(update(Job).where(self._mine()).values(heartbeat_at=utcnow()))
                    row = session.execute(select(Job.status, Job.cancel_requested, Job.attempts)
                                          .where(Job.id == self.job_id)).one_or_none()
                if row is None or row.attempts != self.attempt:
                    self.lost.set()
                if row is None or row.cancel_requested or row.status != JobStatus.RUNNING or self.lost.is_set():
                    self.cancelled.set()
            except Exception:  # a database blip must not kill the job; the next beat tries again
                log.exception("heartbeat for job %s failed", self.job_id)

    def _mine(self) -> Any:
        return (Job.id == self.job_id) & (Job.status == JobStatus.RUNNING) & (Job.attempts == self.attempt)

    def should_cancel(self) -> bool:
        return self.cancelled.is_set()

    def progress(self, event: ProgressEvent) -> None:
        now = time.monotonic()
        if (event.stage == self._last_stage and event.stage != "done"
                and now - self._last_write < self.settings.progress_interval_s):
            return
        self._last_write, self._last_stage = now, event.stage
        data = {"stage": event.stage, "step": event.step, "total_steps": event.total,
                "fraction": round(event.fraction, 4), "message": event.message,
                "elapsed_s": event.elapsed_s, "eta_s": event.eta_s}
        with session_scope(self.settings.database) as session:
            if rows_changed(session, update(Job).where(self._mine()).values(progress=data, updated_at=utcnow())):
                session.add(JobEvent(job_id=self.job_id, kind="progress", data=data))


def reap_stale_jobs(settings: Settings, queue: JobQueue) -> list[str]:
    """Running jobs whose worker stopped heartbeating go back to the queue, or fail once out of attempts.

    Returns the ids of the jobs it failed (the caller fires their webhooks)."""
    cutoff = utcnow() - timedelta(seconds=settings.stale_after_s)
    stale_now = Job.heartbeat_at < cutoff
    failed = []
    with session_scope(settings.database) as session:
        stale = session.execute(select(Job.id, Job.queue, Job.attempts, Job.max_attempts)
                                .where(Job.status == JobStatus.RUNNING, stale_now)).all()
        for job_id, job_queue, attempts, max_attempts in stale:
            if attempts >= max_attempts:
                error = {"code": "worker_lost", "message": f"The worker running this job stopped {attempts} times "
                         "(crash, out of memory or killed); it is not retried again.",
                         "hint": "Try a smaller model or batch size, or ask the operator to check the workers."}
                if states.transition(session, job_id, JobStatus.FAILED, where=stale_now, error=error):
                    failed.append(job_id)
            elif states.transition(session, job_id, JobStatus.QUEUED, where=stale_now,
                                   progress={"stage": "queued", "message": "Worker lost; waiting for another"}):
                log.warning("job %s lost its worker; queued again", job_id)
                queue.enqueue_job(job_id, job_queue)
    return failed

"""One attempt at a job: claim it, run core on its stored inputs, store the artifacts, finish it.

Errors are sorted by who can fix them: a core UserError (or a cancel) ends the job at once with
its message; anything else is treated as infrastructure and retried until the attempts run out.
"""

from __future__ import annotations

import logging
import os
import socket
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import select

from core import Cancelled, Result, UserError
from core.errors import ExportError
from core.intake.files import compress_files
from domain import states
from domain.clock import utcnow
from domain.config import JobConfig, intake_options
from domain.db import session_scope
from domain.models import Artifact, Job
from domain.queue import JobQueue
from domain.read_model import ErrorOut, ProgressOut
from domain.redact import without_paths
from domain.settings import Settings
from domain.states import JobStatus
from domain.storage import Storage, file_digest
from worker import checkpoints
from worker.checkpoints import Keeper, Stored
from worker.lease import Lease
from worker.notify import fire
from worker.scratch import scratch_dir, sweep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Claim:
    """What one attempt needs of its job row, read when the attempt claimed it."""

    attempt: int
    max_attempts: int
    config: dict[str, Any]  # JobConfig as stored; validated inside the attempt, where a failure is retried
    model_key: str
    data_key: str
    queue: str
    checkpoint: Stored | None  # the last accepted step of an earlier attempt


def claim(settings: Settings, job_id: str) -> Claim | None:
    """Move a queued job to running and count the attempt; None when there is nothing to run
    (another delivery of the same message got it, it was cancelled, or it is out of attempts)."""
    with session_scope(settings.database) as session:
        job = session.get(Job, job_id)
        if job is None or job.status != JobStatus.QUEUED:
            return None
        if job.cancel_requested:
            states.transition(session, job_id, JobStatus.CANCELLED, only_from={JobStatus.QUEUED})
            return None
        now = utcnow()
        # the attempt count in the WHERE makes this a compare-and-swap against a concurrent claim
        claimed = states.transition(
            session, job_id, JobStatus.RUNNING, where=Job.attempts == job.attempts, attempts=job.attempts + 1,
            started_at=job.started_at or now, heartbeat_at=now, worker=f"{socket.gethostname()}:{os.getpid()}",
            progress={"stage": "starting", "message": f"Attempt {job.attempts + 1} of {job.max_attempts}"})
        if not claimed:
            return None
        stored = None if job.checkpoint_key is None or job.checkpoint_sha256 is None else Stored(
            job.checkpoint_key, job.checkpoint_sha256, job.checkpoint_step or 0)
        return Claim(attempt=job.attempts + 1, max_attempts=job.max_attempts, config=job.config,
                     model_key=job.model_key, data_key=job.data_key, queue=job.queue, checkpoint=stored)


def run(settings: Settings, storage: Storage, queue: JobQueue, job_id: str) -> None:
    claimed = claim(settings, job_id)
    if claimed is None:
        return
    if claimed.attempt == 1:
        fire(settings, queue, job_id, "job.started")
    sweep(settings.scratch)  # what an earlier attempt that was killed on this machine left
    job = _Attempt(settings, storage, queue, job_id, claimed.attempt)
    lease = Lease(settings, job_id, claimed.attempt)
    try:
        with lease, scratch_dir(settings.scratch, job_id) as scratch:
            config = JobConfig.model_validate(claimed.config)
            result = _compress(settings, storage, claimed, config, scratch, lease, job_id)
            _store_artifacts(settings, storage, job_id, config, result)
    except Cancelled:
        if lease.lost.is_set():
            log.warning("job %s attempt %s lost its lease to another attempt; stopped", job_id, claimed.attempt)
            return
        job.finish(JobStatus.CANCELLED, "job.cancelled")
    except UserError as err:
        job.fail(ErrorOut(code=err.code, message=err.message, hint=err.hint))
    except SoftTimeLimitExceeded:
        job.fail(ErrorOut(
            code="time_limit", message=f"The job ran past the {settings.soft_time_limit_s} s limit.",
            hint="Set method.time_budget_s below the limit, or lower the recovery budget."))
    except ExportError as exc:
        # deterministic for a given model: another attempt would fail the same way
        job.fail(ErrorOut(code="export_failed", message=f"Export failed: {exc}",
                          hint="The pruned model uses an operator the exporter cannot handle."))
    except Exception as exc:  # infrastructure (storage, database, ...) or a bug: worth another attempt
        log.exception("job %s attempt %s failed", job_id, claimed.attempt)
        _retry_or_fail(job, claimed, exc)
    else:
        done = ProgressOut(stage="done", step=1, total_steps=1, fraction=1.0, message=result.report.message)
        job.finish(JobStatus.SUCCEEDED, "job.succeeded",
                   metrics=result.report.headline().model_dump(mode="json"), progress=done.model_dump(mode="json"))


def _compress(settings: Settings, storage: Storage, claimed: Claim, config: JobConfig, scratch: Path,
              lease: Lease, job_id: str) -> Result:
    model, data = (scratch / key.rsplit("/", 1)[-1] for key in (claimed.model_key, claimed.data_key))
    storage.get_file(claimed.model_key, model)
    storage.get_file(claimed.data_key, data)
    resume = None if claimed.checkpoint is None else checkpoints.fetch(storage, job_id, claimed.checkpoint, scratch)
    keeper = Keeper(settings, storage, job_id, claimed.attempt, scratch, claimed.checkpoint)
    return compress_files(model, data, config.target_core(), config.options_core(),
                          intake_options(settings, config), scratch / "out", progress=lease.progress,
                          should_cancel=lease.should_cancel, checkpoint=keeper, resume=resume)


def _store_artifacts(settings: Settings, storage: Storage, job_id: str, config: JobConfig, result: Result) -> None:
    # model_hf.zip: a Hugging Face upload back in its own format, when its config can describe it
    wanted = {f"model.{fmt}" for fmt in config.export} | {"report.json", "model_hf.zip"}
    rows = []
    for name, path in sorted(result.artifacts.items()):
        if name not in wanted:
            continue
        key = f"jobs/{job_id}/artifacts/{name}"
        storage.put_file(key, Path(path))
        size, sha256 = file_digest(Path(path))
        rows.append(Artifact(job_id=job_id, name=name, storage_key=key, size=size, sha256=sha256))
    with session_scope(settings.database) as session:
        # a retried attempt replaces what an earlier one may have stored before dying
        for old in session.scalars(select(Artifact).where(Artifact.job_id == job_id)):
            session.delete(old)
        session.flush()
        session.add_all(rows)


@dataclass(frozen=True)
class _Attempt:
    """How one attempt ends its job: each change applies only while the job is still this attempt's
    (a worker that lost its lease to a later attempt changes nothing)."""

    settings: Settings
    storage: Storage
    queue: JobQueue
    job_id: str
    attempt: int

    def transition(self, status: JobStatus, **fields: Any) -> bool:
        with session_scope(self.settings.database) as session:
            return states.transition(session, self.job_id, status, only_from={JobStatus.RUNNING},
                                     where=Job.attempts == self.attempt, **fields)

    def finish(self, status: JobStatus, event: str, **fields: Any) -> None:
        if not self.transition(status, **fields):
            return
        checkpoints.drop(self.settings, self.storage, self.job_id)
        if status != JobStatus.SUCCEEDED:
            _drop_artifacts(self.settings, self.storage, self.job_id)
        fire(self.settings, self.queue, self.job_id, event)

    def fail(self, error: ErrorOut) -> None:
        self.finish(JobStatus.FAILED, "job.failed", error=error.model_dump(mode="json"))


def _drop_artifacts(settings: Settings, storage: Storage, job_id: str) -> None:
    with session_scope(settings.database) as session:
        for old in session.scalars(select(Artifact).where(Artifact.job_id == job_id)):
            session.delete(old)
    storage.delete_prefix(f"jobs/{job_id}/artifacts")


def _retry_or_fail(job: _Attempt, claimed: Claim, exc: Exception) -> None:
    detail = without_paths("".join(traceback.format_exception_only(exc)).strip())
    if claimed.attempt >= claimed.max_attempts:
        job.fail(ErrorOut(code="internal_error",
                          message=f"The job failed {claimed.attempt} times; last error: {detail}",
                          hint="Ask the operator to check the worker logs."))
        return
    if job.transition(JobStatus.QUEUED, progress={"stage": "queued", "message": f"Retrying after: {detail}"}):
        backoff = job.settings.retry_backoff_s * 2 ** (claimed.attempt - 1)
        job.queue.enqueue_job(job.job_id, claimed.queue, countdown=backoff)

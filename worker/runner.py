"""One attempt at a job: claim it, run core on its stored inputs, store the artifacts, finish it.

Errors are sorted by who can fix them: a core UserError (or a cancel) ends the job at once with
its message; anything else is treated as infrastructure and retried until the attempts run out.
"""

from __future__ import annotations

import logging
import tempfile
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
from domain.settings import Settings
from domain.states import JobStatus
from domain.storage import Storage, file_digest
from worker.lease import Lease
from worker.notify import fire

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
            started_at=job.started_at or now, heartbeat_at=now,
            progress={"stage": "starting", "message": f"Attempt {job.attempts + 1} of {job.max_attempts}"})
        if not claimed:
            return None
        return Claim(attempt=job.attempts + 1, max_attempts=job.max_attempts, config=job.config,
                     model_key=job.model_key, data_key=job.data_key, queue=job.queue)


def run(settings: Settings, storage: Storage, queue: JobQueue, job_id: str) -> None:
    claimed = claim(settings, job_id)
    if claimed is None:
        return
    if claimed.attempt == 1:
        fire(settings, queue, job_id, "job.started")
    try:
        with Lease(settings, job_id) as lease, tempfile.TemporaryDirectory(prefix=f"job-{job_id}-") as scratch:
            config = JobConfig.model_validate(claimed.config)
            result = _compress(settings, storage, claimed, config, Path(scratch), lease)
            _store_artifacts(settings, storage, job_id, config, result)
    except Cancelled:
        _finish(settings, storage, queue, job_id, JobStatus.CANCELLED, "job.cancelled")
    except UserError as err:
        _fail(settings, storage, queue, job_id, ErrorOut(code=err.code, message=err.message, hint=err.hint))
    except SoftTimeLimitExceeded:
        _fail(settings, storage, queue, job_id, ErrorOut(
            code="time_limit", message=f"The job ran past the {settings.soft_time_limit_s} s limit.",
            hint="Set method.time_budget_s below the limit, or lower the recovery budget."))
    except ExportError as exc:
        # deterministic for a given model: another attempt would fail the same way
        _fail(settings, storage, queue, job_id, ErrorOut(
            code="export_failed", message=f"Export failed: {exc}",
            hint="The pruned model uses an operator the exporter cannot handle."))
    except Exception as exc:  # infrastructure (storage, database, ...) or a bug: worth another attempt
        log.exception("job %s attempt %s failed", job_id, claimed.attempt)
        _retry_or_fail(settings, storage, queue, job_id, claimed, exc)
    else:
        done = ProgressOut(stage="done", step=1, total_steps=1, fraction=1.0, message=result.report.message)
        _finish(settings, storage, queue, job_id, JobStatus.SUCCEEDED, "job.succeeded",
                metrics=result.report.headline().model_dump(mode="json"), progress=done.model_dump(mode="json"))


def _compress(settings: Settings, storage: Storage, claimed: Claim, config: JobConfig, scratch: Path,
              lease: Lease) -> Result:
    model, data = (scratch / key.rsplit("/", 1)[-1] for key in (claimed.model_key, claimed.data_key))
    storage.get_file(claimed.model_key, model)
    storage.get_file(claimed.data_key, data)
    return compress_files(model, data, config.target_core(), config.options_core(),
                          intake_options(settings, config), scratch / "out", progress=lease.progress,
                          should_cancel=lease.should_cancel)


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


def _finish(settings: Settings, storage: Storage, queue: JobQueue, job_id: str, status: JobStatus, event: str,
            **fields: Any) -> None:
    with session_scope(settings.database) as session:
        done = states.transition(session, job_id, status, only_from={JobStatus.RUNNING}, **fields)
    if not done:
        return
    if status != JobStatus.SUCCEEDED:
        _drop_artifacts(settings, storage, job_id)
    fire(settings, queue, job_id, event)


def _fail(settings: Settings, storage: Storage, queue: JobQueue, job_id: str, error: ErrorOut) -> None:
    _finish(settings, storage, queue, job_id, JobStatus.FAILED, "job.failed", error=error.model_dump(mode="json"))


def _drop_artifacts(settings: Settings, storage: Storage, job_id: str) -> None:
    with session_scope(settings.database) as session:
        for old in session.scalars(select(Artifact).where(Artifact.job_id == job_id)):
            session.delete(old)
    storage.delete_prefix(f"jobs/{job_id}/artifacts")


def _retry_or_fail(settings: Settings, storage: Storage, queue: JobQueue, job_id: str, claimed: Claim,
                   exc: Exception) -> None:
    detail = "".join(traceback.format_exception_only(exc)).strip()
    if claimed.attempt >= claimed.max_attempts:
        _fail(settings, storage, queue, job_id, ErrorOut(
            code="internal_error", message=f"The job failed {claimed.attempt} times; last error: {detail}",
            hint="Ask the operator to check the worker logs."))
        return
    with session_scope(settings.database) as session:
        requeued = states.transition(session, job_id, JobStatus.QUEUED, only_from={JobStatus.RUNNING},
                                     progress={"stage": "queued", "message": f"Retrying after: {detail}"})
    if requeued:
        backoff = settings.retry_backoff_s * 2 ** (claimed.attempt - 1)
        queue.enqueue_job(job_id, claimed.queue, countdown=backoff)

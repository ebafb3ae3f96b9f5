"""Helpers for the UI tests: tenants with keys and jobs written straight to the database (states the
UI must show, such as a failure, without waiting for a worker to produce them)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import update

from api.services.tenants import create_key, get_or_create_tenant
from core.report import Report
from domain import states
from domain.db import session_scope
from domain.models import Artifact, Job, new_id
from domain.settings import Settings
from domain.states import JobStatus
from domain.storage import file_digest, open_storage

# what the worker writes when a job outlives its time limit
FAILURE = {"code": "time_limit", "message": "The job ran past the 21600 s limit.",
           "hint": "Set method.time_budget_s below the limit, or lower the recovery budget."}


def tenant_with_key(database: str, name: str) -> tuple[str, str]:
    """(tenant id, API key)."""
    with session_scope(database) as session:
        tenant, _ = get_or_create_tenant(session, name)
        return tenant.id, create_key(session, tenant)


def add_job(database: str, tenant_id: str, status: str = JobStatus.QUEUED, age_s: float = 0.0,
            error: dict[str, Any] | None = None, name: str | None = None, model_filename: str | None = None) -> str:
    """A job that no worker will run, in `status` (reached through the state machine)."""
    job_id = new_id()
    config = {"architecture": "idap:digits"} | ({"name": name} if name else {})
    with session_scope(database) as session:
        session.add(Job(id=job_id, tenant_id=tenant_id, queue="ui-test", config=config,
                        model_key="none", data_key="none", model_filename=model_filename, max_attempts=1,
                        created_at=datetime.now(UTC) - timedelta(seconds=age_s),
                        progress={"stage": "queued", "message": "Waiting for a worker"}))
    with session_scope(database) as session:
        if status in (JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED):
            # as the worker's claim does: the running attempt is counted (a cancelled job never ran)
            assert states.transition(session, job_id, JobStatus.RUNNING, attempts=1)
        if status not in (JobStatus.QUEUED, JobStatus.RUNNING):
            assert states.transition(session, job_id, JobStatus(status),
                                     **({"error": error} if status == JobStatus.FAILED else {}))
    return job_id


def add_report(settings: Settings, job_id: str, report: Report, scratch: Path) -> None:
    """`report` as a succeeded job's report.json and metrics, stored as the worker stores them."""
    path = scratch / f"{job_id}-report.json"
    report.write(path)
    key = f"jobs/{job_id}/artifacts/report.json"
    open_storage(settings.storage).put_file(key, path)
    size, sha256 = file_digest(path)
    with session_scope(settings.database) as session:
        session.add(Artifact(job_id=job_id, name="report.json", storage_key=key, size=size, sha256=sha256))
        session.execute(update(Job).where(Job.id == job_id).values(
            metrics=report.headline().model_dump(mode="json")))

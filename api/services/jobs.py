"""Jobs: creation from an upload, reads, cancel, delete. Every query goes through `tenant_jobs`."""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from fastapi import Request
from pydantic import ValidationError
from sqlalchemy import Select, and_, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.errors import ApiError, describe_validation, not_found
from api.schemas import InspectConfig, JobList
from api.services.intake import admitted, preflight, require_feasible
from api.services.sandbox import SandboxPool
from api.services.uploads import Form, receive_form
from core import Report, UserError
from domain import outbox, states
from domain.config import JobConfig
from domain.db import get_sessionmaker
from domain.models import Artifact, Job, Tenant, WebhookDelivery, new_id
from domain.outbox import Relay
from domain.read_model import job_out
from domain.settings import Settings
from domain.states import JobStatus
from domain.storage import Storage
from domain.webhooks import WebhookUrlError, check_url
from domain.workers import device_problem

Config = TypeVar("Config", JobConfig, InspectConfig)


def tenant_jobs(tenant: Tenant) -> Select[Job]:
    """The one place that scopes job queries to the caller: a job of another tenant does not exist."""
    return select(Job).where(Job.tenant_id == tenant.id)


def get_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    job = session.scalar(tenant_jobs(tenant).where(Job.id == job_id))
    if job is None:
        raise not_found()
    return job


def parse_config(raw: str | None, model: type[Config]) -> Config:
    if raw is None:
        raise ApiError(422, "invalid_config", "The config form field is missing.",
                       'Send config as JSON, e.g. {"target": {"macs_reduction": 0.5}}.')
    try:
        config = model.model_validate_json(raw)
        target = config.target_core()
        if target is not None:
            target.validate()
        config.options_core().validate()
    except ValidationError as exc:
        raise ApiError(422, "invalid_config", f"Invalid config: {describe_validation(exc.errors())}.",
                       "See the JobConfig schema at /docs.") from exc
    except UserError as err:
        raise ApiError.from_user_error(err) from err
    return config


def _existing(sessions: sessionmaker[Session], tenant: Tenant, key: str | None) -> Job | None:
    if key is None:
        return None
    with sessions() as session:
        return session.scalar(tenant_jobs(tenant).where(Job.idempotency_key == key)
                              .options(selectinload(Job.artifacts)))


def _insert(sessions: sessionmaker[Session], job: Job) -> None:
    """The job and its dispatch (the outbox row the relay sends to the broker), in one transaction."""
    with sessions.begin() as session:
        session.add(job)
        outbox.add(session, job.id, job.queue)


async def create_job(request: Request, settings: Settings, storage: Storage, sandbox: SandboxPool, relay: Relay,
                     tenant: Tenant) -> tuple[Job, bool]:
    """Receive the upload, check it in a sandbox, store it, then commit the job with its dispatch in one
    short transaction and wake the relay that sends it to the broker (domain.outbox): a job exists
    exactly when the answer is 2xx, whether or not the broker is up. No database connection is held
    while the upload streams, the sandbox checks it or the storage takes it.

    Returns (job, created); an idempotency key seen before returns the earlier job.
    """
    sessions = get_sessionmaker(settings.database)
    with admitted(sandbox):
        scratch = Path(tempfile.mkdtemp(prefix="upload-", dir=scratch_root(settings)))
        try:
            form = await receive_form(request, scratch, {"model", "data"}, settings.max_upload_bytes)
            config = parse_config(form.fields.get("config"), JobConfig)
            for name in ("model", "data"):
                if name not in form.files:
                    raise ApiError(422, "missing_file", f"The {name} file is missing.",
                                   "Send the model and the data as multipart file fields named model and data.")
            earlier = await run_in_threadpool(_existing, sessions, tenant, config.idempotency_key)
            if earlier is not None:
                return earlier, False
            await run_in_threadpool(require_device, sessions, settings, config.device)
            if config.webhook_url is not None:
                try:
                    await run_in_threadpool(check_url, config.webhook_url, settings.webhook_allow_private)
                except WebhookUrlError as exc:
                    raise ApiError(422, "webhook_url_refused", str(exc),
                                   "Use a publicly reachable http(s) URL for webhook_url.") from exc
            require_feasible(await preflight(sandbox, settings, config, form.files["model"], form.files["data"]))
            job, created = await _store_and_commit(sessions, settings, storage, tenant, config, form)
            if created:
                relay.wake()
            return job, created
        finally:
            await run_in_threadpool(shutil.rmtree, scratch, True)


async def _store_and_commit(sessions: sessionmaker[Session], settings: Settings, storage: Storage, tenant: Tenant,
                            config: JobConfig, form: Form) -> tuple[Job, bool]:
    """(job, created): the new job, or the one a concurrent request with the same idempotency key committed."""
    job_id = new_id()
    keys = {name: f"jobs/{job_id}/inputs/{path.name}" for name, path in form.files.items()}
    job = Job(id=job_id, tenant_id=tenant.id, queue=settings.queue_for(config.device),
              config=config.model_dump(mode="json"), idempotency_key=config.idempotency_key,
              webhook_url=config.webhook_url, model_key=keys["model"], data_key=keys["data"],
              model_filename=form.filenames.get("model"), data_filename=form.filenames.get("data"),
              max_attempts=settings.max_attempts, artifacts=[],
              progress={"stage": "queued", "message": "Waiting for a worker"})
    try:
        for name, path in form.files.items():
            await run_in_threadpool(storage.put_file, keys[name], path)
        await run_in_threadpool(_insert, sessions, job)
    except BaseException as exc:
        # no job row, so no stored inputs either (the storage or the database failed, or a race was lost)
        await run_in_threadpool(storage.delete_prefix, f"jobs/{job_id}")
        winner = None
        if isinstance(exc, IntegrityError):
            winner = await run_in_threadpool(_existing, sessions, tenant, config.idempotency_key)
        if winner is None:
            raise
        return winner, False
    return job, True


def require_device(sessions: sessionmaker[Session], settings: Settings, device: str) -> None:
    """A job asking for a CUDA device no worker has is refused now, not failed by a worker later."""
    with sessions() as session:
        problem = device_problem(session, settings, device)
    if problem is not None:
        raise ApiError(422, "device_unavailable", problem, "Use device auto or cpu, or a CUDA device a worker has.")


def scratch_root(settings: Settings) -> Path:
    root = settings.data_dir / "uploads"
    root.mkdir(parents=True, exist_ok=True)
    return root


def _encode_cursor(job: Job) -> str:
    return base64.urlsafe_b64encode(json.dumps([job.created_at.isoformat(), job.id]).encode()).decode()


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        created, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(created), str(job_id)
    except (ValueError, TypeError) as exc:
        raise ApiError(400, "invalid_cursor", "The cursor is not valid.",
                       "Pass next_cursor from a previous page unchanged.") from exc


def list_jobs(session: Session, tenant: Tenant, status: str | None, cursor: str | None, limit: int,
              base_url: str) -> JobList:
    query = tenant_jobs(tenant)
    if status is not None:
        query = query.where(Job.status == status)
    if cursor is not None:
        created, job_id = _decode_cursor(cursor)
        query = query.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    jobs = list(session.scalars(query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    more = len(jobs) > limit
    jobs = jobs[:limit]
    return JobList(jobs=[job_out(job, base_url) for job in jobs],
                   next_cursor=_encode_cursor(jobs[-1]) if more else None)


def cancel_job(session: Session, tenant: Tenant, job_id: str) -> Job:
    """A queued job is cancelled at once; a running one when its worker next checks (within seconds)."""
    job = get_job(session, tenant, job_id)
    if job.status == JobStatus.QUEUED and states.transition(session, job.id, JobStatus.CANCELLED,
                                                            only_from={JobStatus.QUEUED}):
        session.refresh(job)
        return job
    if job.status in states.TERMINAL:
        raise ApiError(409, "job_finished", f"The job is already {job.status}.", "Only queued or running jobs "
                       "can be cancelled.")
    job.cancel_requested = True
    session.commit()
    session.refresh(job)
    return job


def delete_job(session: Session, storage: Storage, tenant: Tenant, job_id: str) -> None:
    job = get_job(session, tenant, job_id)
    if job.status not in states.TERMINAL:
        raise ApiError(409, "job_active", f"The job is {job.status}.", "Cancel it first, then delete it.")
    storage.delete_prefix(f"jobs/{job.id}")
    session.delete(job)
    session.commit()


def get_artifact(session: Session, tenant: Tenant, job_id: str, name: str) -> Artifact:
    job = get_job(session, tenant, job_id)
    found = session.scalar(select(Artifact).where(Artifact.job_id == job.id, Artifact.name == name))
    if found is None:
        raise not_found("Artifact")
    return found


def get_report(session: Session, storage: Storage, tenant: Tenant, job_id: str) -> Report:
    """The job's report.json as the typed report core wrote; 404 until the job has one."""
    artifact = get_artifact(session, tenant, job_id, "report.json")
    return Report.model_validate_json(b"".join(storage.iter_bytes(artifact.storage_key)))


def webhook_deliveries(session: Session, tenant: Tenant, job_id: str) -> list[WebhookDelivery]:
    job = get_job(session, tenant, job_id)
    return list(session.scalars(select(WebhookDelivery).where(WebhookDelivery.job_id == job.id)
                                .order_by(WebhookDelivery.id)))

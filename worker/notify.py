"""Firing a job's webhook: every attempt is a task on the webhook queue, which its own worker
serves (`idap serve` starts one beside the job worker), so a delivery or a retry never waits for a
job to finish. Only when the broker cannot take the task is the first attempt made here."""

from __future__ import annotations

import logging
from typing import Any

from domain.db import session_scope
from domain.models import Job, Tenant
from domain.queue import JobQueue
from domain.read_model import job_out
from domain.settings import Settings
from domain.webhooks import attempt, new_event

log = logging.getLogger(__name__)


def base_url(settings: Settings) -> str:
    return settings.public_url or f"http://{settings.host}:{settings.port}"


def fire(settings: Settings, queue: JobQueue, job_id: str, event_type: str) -> None:
    with session_scope(settings.database) as session:
        job = session.get(Job, job_id)
        if job is None or job.webhook_url is None:
            return
        tenant = session.get(Tenant, job.tenant_id)
        assert tenant is not None  # the foreign key guarantees it
        event_id, body = new_event(event_type, job_out(job, base_url(settings)).model_dump(mode="json"))
        payload = {"job_id": job.id, "url": job.webhook_url, "event_type": event_type, "event_id": event_id,
                   "body": body, "attempt_no": 1}
    try:
        queue.enqueue_webhook(payload)
    except Exception:  # the broker is down: one attempt now rather than none
        log.exception("could not queue the %s webhook of job %s; delivering it here", event_type, job_id)
        deliver(settings, queue, payload, secret=tenant.webhook_secret)


def deliver(settings: Settings, queue: JobQueue, payload: dict[str, Any], secret: str | None = None) -> None:
    """One attempt of `payload`; schedules the next one when the receiver may come back."""
    with session_scope(settings.database) as session:
        if secret is None:
            job = session.get(Job, payload["job_id"])
            if job is None:
                return  # deleted since; nothing to report on
            tenant = session.get(Tenant, job.tenant_id)
            assert tenant is not None
            secret = tenant.webhook_secret
        delay = attempt(session, secret=secret, schedule=settings.webhook_retry_schedule_s,
                        timeout=settings.webhook_timeout_s, allow_private=settings.webhook_allow_private, **payload)
    if delay is not None:
        try:
            queue.enqueue_webhook(payload | {"attempt_no": payload["attempt_no"] + 1}, countdown=delay)
        except Exception:  # a broker outage must not fail the job whose event this is
            log.exception("could not schedule webhook retry for job %s", payload["job_id"])

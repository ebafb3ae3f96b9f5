"""The job queue both processes share: the API enqueues jobs, the workers enqueue retries and webhooks.

Tasks are sent by name, so enqueuing needs no worker code (and no torch). The Celery app is built
from the `Settings` it is given, never at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from celery import Celery
from sqlalchemy import make_url

from domain.db import private_sqlite_file
from domain.settings import Settings

RUN_JOB = "idap.run_job"
DELIVER_WEBHOOK = "idap.deliver_webhook"


class JobQueue(Protocol):
    def enqueue_job(self, job_id: str, queue: str, countdown: float | None = None) -> None: ...
    def enqueue_webhook(self, payload: dict[str, Any], countdown: float | None = None) -> None: ...
    def ping(self) -> None:
        """Raise when the broker cannot be reached."""


def celery_config(settings: Settings) -> dict[str, Any]:
    broker = settings.broker
    if broker.startswith("sqla+sqlite"):
        private_sqlite_file(Path(make_url(broker.removeprefix("sqla+")).database or settings.data_dir / "broker.db"))
    return {
        "broker_url": broker,
        "broker_connection_retry_on_startup": True,
        # A job is acknowledged only when it has finished, and put back when its worker dies mid-job;
        # the job row's attempt counter (not the broker) decides whether it runs again.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_soft_time_limit": settings.soft_time_limit_s,
        "task_time_limit": settings.hard_time_limit_s,
        "task_default_queue": settings.cpu_queue,
        "task_routes": {DELIVER_WEBHOOK: {"queue": settings.webhook_queue}},
        # Fail fast at submission when the broker is down instead of hanging the request.
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0, "interval_step": 0.5,
                                      "interval_max": 1},
        # Redis redelivers unacknowledged jobs after this; the SQLAlchemy transport would pass it to create_engine.
        "broker_transport_options": ({"visibility_timeout": settings.broker_visibility_timeout_s}
                                     if broker.startswith(("redis", "rediss")) else {}),
        "worker_hijack_root_logger": False,
    }


def make_celery(settings: Settings) -> Celery:
    app = Celery("idap")
    app.config_from_object(celery_config(settings))
    return app


class CeleryQueue:
    """`JobQueue` over a Celery app; the worker registers its tasks on the same `app`."""

    def __init__(self, settings: Settings) -> None:
        self.app = make_celery(settings)

    def enqueue_job(self, job_id: str, queue: str, countdown: float | None = None) -> None:
        self.app.send_task(RUN_JOB, args=[job_id], queue=queue, countdown=countdown)

    def enqueue_webhook(self, payload: dict[str, Any], countdown: float | None = None) -> None:
        self.app.send_task(DELIVER_WEBHOOK, kwargs=payload, countdown=countdown)

    def ping(self) -> None:
        with self.app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=3)

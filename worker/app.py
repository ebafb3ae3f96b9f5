"""The Celery app: `celery -A worker.app worker -Q cpu,webhooks` (or gpu,webhooks on a GPU machine).

Importing this module is light (no torch): the API imports it to enqueue by task name.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from api.settings import Settings, get_settings

RUN_JOB = "idap.run_job"
DELIVER_WEBHOOK = "idap.deliver_webhook"


def celery_config(settings: Settings) -> dict[str, Any]:
    broker = settings.broker
    if broker.startswith("sqla+sqlite"):
        settings.data_dir.mkdir(parents=True, exist_ok=True)
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
        "imports": ["worker.tasks"],
    }


celery_app = Celery("idap")
celery_app.config_from_object(celery_config(get_settings()))


def enqueue_job(job_id: str, queue: str, countdown: float | None = None) -> None:
    celery_app.send_task(RUN_JOB, args=[job_id], queue=queue, countdown=countdown)


def enqueue_webhook(payload: dict[str, Any], countdown: float) -> None:
    celery_app.send_task(DELIVER_WEBHOOK, kwargs=payload, countdown=countdown)

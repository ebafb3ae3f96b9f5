"""Celery tasks. Each takes ids or plain data; the job row is the source of truth."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from celery.signals import worker_ready

from domain.queue import DELIVER_WEBHOOK, RUN_JOB
from domain.settings import get_settings
from domain.storage import open_storage
from worker import runner
from worker.app import celery_app, queue
from worker.lease import reap_stale_jobs
from worker.notify import deliver, fire

log = logging.getLogger(__name__)


@celery_app.task(name=RUN_JOB)
def run_job(job_id: str) -> None:
    settings = get_settings()
    runner.run(settings, open_storage(settings.storage, settings.s3_endpoint_url), queue, job_id)


@celery_app.task(name=DELIVER_WEBHOOK)
def deliver_webhook(**payload: Any) -> None:
    deliver(get_settings(), queue, payload)


def _reaper() -> None:
    settings = get_settings()
    while True:
        time.sleep(settings.reaper_interval_s)
        try:
            for job_id in reap_stale_jobs(settings, queue):
                fire(settings, queue, job_id, "job.failed")
        except Exception:  # keep reaping after a database or broker blip
            log.exception("reaping stale jobs failed")


@worker_ready.connect
def _start_reaper(**_kwargs: Any) -> None:
    # Every worker reaps, so a job whose worker died is picked up by whichever worker is still alive.
    threading.Thread(target=_reaper, name="idap-reaper", daemon=True).start()

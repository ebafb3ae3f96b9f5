"""Celery tasks. Each takes ids or plain data; the job row is the source of truth."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import torch
from celery.signals import worker_ready

from domain.queue import DELIVER_WEBHOOK, RUN_JOB
from domain.settings import Settings, get_settings
from domain.storage import open_storage
from domain.workers import report_worker
from worker import checkpoints, runner
from worker.app import celery_app, queue
from worker.lease import reap_stale_jobs
from worker.notify import deliver, fire
from worker.scratch import sweep

log = logging.getLogger(__name__)


@celery_app.task(name=RUN_JOB)
def run_job(job_id: str) -> None:
    settings = get_settings()
    runner.run(settings, open_storage(settings.storage, settings.s3_endpoint_url), queue, job_id)


@celery_app.task(name=DELIVER_WEBHOOK)
def deliver_webhook(**payload: Any) -> None:
    deliver(get_settings(), queue, payload)


def _reaper(settings: Settings, name: str, queues: list[str]) -> None:
    """Each tick: report this worker (its devices, that it is alive), and take over the jobs of dead ones."""
    storage = open_storage(settings.storage, settings.s3_endpoint_url)
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if settings.worker_gpu is not None and devices == 0:
        # it still takes the gpu queue, so the operator has to hear that its GPU is missing
        log.error("pinned to GPU %s, but CUDA sees no device here: its CUDA jobs will fail", settings.worker_gpu)
    while True:
        try:
            report_worker(settings, name, queues, devices, settings.worker_gpu)
            for job_id in reap_stale_jobs(settings, queue):
                checkpoints.drop(settings, storage, job_id)
                fire(settings, queue, job_id, "job.failed")
        except Exception:  # keep reaping after a database or broker blip
            log.exception("reaping stale jobs failed")
        time.sleep(settings.reaper_interval_s)


@worker_ready.connect
def _start_reaper(sender: Any = None, **_kwargs: Any) -> None:
    # Every worker reaps, so a job whose worker died is picked up by whichever worker is still alive.
    settings = get_settings()
    sweep(settings.scratch)
    name = getattr(sender, "hostname", None) or "worker"
    queues = sorted(celery_app.amqp.queues.consume_from or [])
    threading.Thread(target=_reaper, args=(settings, name, queues), name="idap-reaper", daemon=True).start()

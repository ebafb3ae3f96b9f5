"""The workers' reports of themselves: each worker upserts its row when it starts and on every
reaper tick, so the API can check a job's `device` against the CUDA devices workers have."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from domain.clock import utcnow
from domain.db import session_scope
from domain.models import Worker
from domain.settings import Settings


def report_worker(settings: Settings, name: str, queues: list[str], cuda_devices: int) -> None:
    now = utcnow()
    with session_scope(settings.database) as session:
        row = session.get(Worker, name)
        if row is None:
            session.add(Worker(name=name, queues=queues, cuda_devices=cuda_devices, started_at=now, seen_at=now))
        else:
            row.queues, row.cuda_devices, row.seen_at = queues, cuda_devices, now


def cuda_devices(session: Session, settings: Settings) -> int:
    """The most CUDA devices any worker seen within device_report_ttl_s has."""
    since = utcnow() - timedelta(seconds=settings.device_report_ttl_s)
    return session.scalar(select(func.max(Worker.cuda_devices)).where(Worker.seen_at >= since)) or 0


def device_problem(session: Session, settings: Settings, device: str) -> str | None:
    """Why no worker can run a job on `device` ("cuda" or "cuda:N"), or None when one can."""
    if not device.startswith("cuda"):
        return None
    count = cuda_devices(session, settings)
    index = int(device.partition(":")[2] or 0)
    if index < count:
        return None
    if count == 0:
        return f"No worker reports a CUDA device, so device {device} cannot run."
    return f"There is no CUDA device {index}: the workers report {count} (cuda:0 to cuda:{count - 1})."

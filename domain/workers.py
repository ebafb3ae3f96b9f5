"""The workers' reports of themselves: each worker upserts its row when it starts and on every
reaper tick, so the API can check a job's `device` against the CUDA devices workers have and show
which workers are live (reported within worker_live_s)."""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from domain.clock import utcnow
from domain.db import session_scope
from domain.models import Worker
from domain.settings import Settings


class WorkerKind(StrEnum):
    # GPU: takes the gpu queue and has a CUDA device; CPU: takes a job queue otherwise; WEBHOOKS: no job queue
    CPU = "cpu"
    GPU = "gpu"
    WEBHOOKS = "webhooks"


def report_worker(settings: Settings, name: str, queues: list[str], cuda_devices: int,
                  pinned_gpu: int | None = None) -> None:
    now = utcnow()
    with session_scope(settings.database) as session:
        row = session.get(Worker, name)
        if row is None:
            session.add(Worker(name=name, queues=queues, cuda_devices=cuda_devices, pinned_gpu=pinned_gpu,
                               started_at=now, seen_at=now))
        else:
            row.queues, row.cuda_devices, row.pinned_gpu, row.seen_at = queues, cuda_devices, pinned_gpu, now


def live_workers(session: Session, settings: Settings) -> list[Worker]:
    """Workers that reported within worker_live_s (they report every reaper tick), by name."""
    return _seen_within(session, settings.worker_live_s)


def _seen_within(session: Session, seconds: float) -> list[Worker]:
    since = utcnow() - timedelta(seconds=seconds)
    return list(session.scalars(select(Worker).where(Worker.seen_at >= since).order_by(Worker.name)))


def worker_kind(settings: Settings, worker: Worker) -> WorkerKind:
    # A worker on the gpu queue without CUDA (`idap serve` on a CPU machine takes both queues) runs jobs on the CPU.
    if settings.gpu_queue in worker.queues and worker.cuda_devices > 0:
        return WorkerKind.GPU
    if settings.gpu_queue in worker.queues or settings.cpu_queue in worker.queues:
        return WorkerKind.CPU
    return WorkerKind.WEBHOOKS


def count_kinds(settings: Settings, workers: list[Worker]) -> dict[WorkerKind, int]:
    """How many of `workers` are of each kind (every kind present, zero included)."""
    counts = dict.fromkeys(WorkerKind, 0)
    for worker in workers:
        counts[worker_kind(settings, worker)] += 1
    return counts


def device_problem(session: Session, settings: Settings, device: str) -> str | None:
    """Why no worker can run a job on `device` ("cuda" or "cuda:N"), or None when one can.

    A job on the gpu queue may be taken by any GPU worker, so `cuda:N` needs device N on every one
    seen within device_report_ttl_s (not only the live ones: a job submitted while the workers restart
    waits for them); a worker pinned to one GPU sees it as cuda:0."""
    if not device.startswith("cuda"):
        return None
    counts = [w.cuda_devices for w in _seen_within(session, settings.device_report_ttl_s)
              if worker_kind(settings, w) is WorkerKind.GPU]
    index = int(device.partition(":")[2] or 0)
    if not counts:
        return f"No worker reports a CUDA device, so device {device} cannot run."
    if index < min(counts):
        return None
    return (f"There is no CUDA device {index} on every GPU worker: each sees at least {min(counts)} "
            f"(cuda:0 to cuda:{min(counts) - 1}); a worker pinned to one GPU sees it as cuda:0, so ask for cuda.")

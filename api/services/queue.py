"""GET /v1/queue: jobs waiting and running, and the live workers (how many run on GPUs, and which)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.schemas import QueueOut, WorkerOut
from domain.models import Job
from domain.settings import Settings
from domain.states import JobStatus
from domain.workers import WorkerKind, count_kinds, live_workers, worker_kind


def queue_view(session: Session, settings: Settings) -> QueueOut:
    rows = live_workers(session, settings)
    workers = [WorkerOut(name=w.name, kind=worker_kind(settings, w), queues=w.queues, cuda_devices=w.cuda_devices,
                         pinned_gpu=w.pinned_gpu, started_at=w.started_at, seen_at=w.seen_at)
               for w in rows]
    statuses = dict(session.execute(select(Job.status, func.count())
                                    .where(Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
                                    .group_by(Job.status)).all())
    waiting = dict(session.execute(select(Job.queue, func.count()).where(Job.status == JobStatus.QUEUED)
                                   .group_by(Job.queue)).all())
    by_kind = count_kinds(settings, rows)
    return QueueOut(queued=statuses.get(JobStatus.QUEUED, 0), queued_by_queue=waiting,
                    running=statuses.get(JobStatus.RUNNING, 0), workers_live=len(workers),
                    gpu_workers_live=by_kind[WorkerKind.GPU], workers_by_kind=by_kind,
                    gpus=sorted(w.pinned_gpu for w in workers if w.kind is WorkerKind.GPU and w.pinned_gpu is not None),
                    workers=workers)


def gpu_workers_live(session: Session, settings: Settings) -> int:
    return count_kinds(settings, live_workers(session, settings))[WorkerKind.GPU]

"""Server-Sent Events for one job: its progress log and status changes, read from the database
(the worker writing them is another process), ending once the job is finished."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from domain import states
from domain.db import get_sessionmaker
from domain.models import Job, JobEvent

POLL_S = 0.5
KEEPALIVE_S = 15.0


def _fetch(database: str, job_id: str, after: int) -> tuple[list[JobEvent], str | None]:
    with get_sessionmaker(database)() as session:
        events = list(session.scalars(select(JobEvent).where(JobEvent.job_id == job_id, JobEvent.id > after)
                                      .order_by(JobEvent.id).limit(500)))
        return events, session.scalar(select(Job.status).where(Job.id == job_id))


async def stream(database: str, job_id: str, after: int) -> AsyncIterator[str]:
    """`after` is the Last-Event-ID a reconnecting client sends, so it misses nothing."""
    idle = 0.0
    while True:
        events, status = await run_in_threadpool(_fetch, database, job_id, after)
        for event in events:
            after = event.id
            yield f"id: {event.id}\nevent: {event.kind}\ndata: {json.dumps(event.data)}\n\n"
        if not events and (status is None or status in states.TERMINAL):
            return
        if events:
            idle = 0.0
            continue
        if idle >= KEEPALIVE_S:
            idle = 0.0
            yield ": keepalive\n\n"
        await asyncio.sleep(POLL_S)
        idle += POLL_S

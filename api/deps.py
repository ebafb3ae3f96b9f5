"""FastAPI dependencies, as `Annotated` aliases the routes declare."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from api.services.sandbox import SandboxPool
from domain.db import get_sessionmaker
from domain.outbox import Relay
from domain.queue import JobQueue
from domain.settings import Settings
from domain.storage import Storage


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _session(request: Request) -> Iterator[Session]:
    with get_sessionmaker(request.app.state.settings.database)() as session:
        yield session


def _storage(request: Request) -> Storage:
    return request.app.state.storage


def _queue(request: Request) -> JobQueue:
    return request.app.state.queue


def _sandbox(request: Request) -> SandboxPool:
    return request.app.state.sandbox


def _relay(request: Request) -> Relay:
    return request.app.state.relay


SettingsDep = Annotated[Settings, Depends(_settings)]
SessionDep = Annotated[Session, Depends(_session)]
StorageDep = Annotated[Storage, Depends(_storage)]
QueueDep = Annotated[JobQueue, Depends(_queue)]
SandboxDep = Annotated[SandboxPool, Depends(_sandbox)]
RelayDep = Annotated[Relay, Depends(_relay)]

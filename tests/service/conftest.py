"""Service tests run against the real thing: a throwaway Postgres database, Redis as the broker
and a real Celery worker process. Each pytest process gets its own database and queue names."""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

from domain.settings import Settings
from tests.service.helpers import start_worker, stop_worker

RUN = secrets.token_hex(4)
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
DB_NAME = f"idap_test_{RUN}"
# One settings object for the whole run, passed to what needs it (the app, the worker process through
# Settings.child_environment): no IDAP_* variable is set in this process.
SETTINGS = Settings(
    data_dir=Path(tempfile.mkdtemp(prefix=f"idap-service-{RUN}-")),
    database_url=f"postgresql+psycopg://postgres@127.0.0.1:5432/{DB_NAME}",
    broker_url="redis://127.0.0.1:6379/11",
    cpu_queue=f"test-{RUN}-cpu",
    gpu_queue=f"test-{RUN}-gpu",
    webhook_queue=f"test-{RUN}-webhooks",
    webhook_allow_private=True,
    webhook_retry_schedule_s=[0.5, 0.5],
    webhook_timeout_s=5,
    heartbeat_interval_s=0.5,
    stale_after_s=3,
    reaper_interval_s=1,
    retry_backoff_s=0.5,
    progress_interval_s=0.2,
    max_upload_bytes=2 * 1024 * 1024,
    require_auth=True,
    metrics_token="metrics-token-of-the-tests",
)


@pytest.fixture(scope="session", autouse=True)
def database() -> Iterator[str]:
    from domain.db import get_engine, upgrade

    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{DB_NAME}"')
    url = SETTINGS.database
    upgrade(url)
    yield url
    get_engine(url).dispose()
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
    broker = redis.Redis.from_url(SETTINGS.broker)
    for key in broker.scan_iter(f"*test-{RUN}-*"):
        broker.delete(key)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return SETTINGS


@pytest.fixture(scope="session", autouse=True)
def gpu_reported(database: str) -> None:
    """A GPU worker's report of one CUDA device, so that jobs may ask for `cuda` (and park on the GPU
    queue, which no test worker serves)."""
    from domain.workers import report_worker

    report_worker(SETTINGS, "gpu@reported-by-the-tests", [SETTINGS.gpu_queue], 1)


@pytest.fixture(scope="session")
def worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Real Celery worker processes for the session, as `idap serve` runs them: one for jobs and one
    for webhooks; yields the job worker's log file."""
    logs = tmp_path_factory.mktemp("worker")
    jobs = start_worker(settings, logs / "worker.log")
    webhooks = start_worker(settings, logs / "webhooks.log", queues=settings.webhook_queue, pool="threads",
                            concurrency=4)
    yield logs / "worker.log"
    stop_worker(jobs)
    stop_worker(webhooks)


@pytest.fixture(scope="session")
def keys(database: str) -> dict[str, str]:
    """API keys of two tenants, and tenant a's webhook secret."""
    from api.services.tenants import create_key, get_or_create_tenant
    from domain.db import session_scope

    out = {}
    with session_scope(database) as session:
        for name in ("a", "b"):
            tenant, _ = get_or_create_tenant(session, f"tenant-{name}-{RUN}")
            out[name] = create_key(session, tenant)
            out[f"{name}_secret"] = tenant.webhook_secret
    return out


@pytest.fixture(scope="session")
def client(settings: Settings) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    from api.app import create_app

    with TestClient(create_app(settings)) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def digits(digits_files: tuple[Path, Path]) -> tuple[Path, Path]:
    """(model.safetensors, data.npz): the upload form of the digits example (architecture idap:digits)."""
    return digits_files[0].with_suffix(".safetensors"), digits_files[1]

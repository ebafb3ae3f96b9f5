"""Service tests run against the real thing: a throwaway Postgres database, Redis as the broker
and a real Celery worker process. Each pytest process gets its own database and queue names."""

from __future__ import annotations

import os
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import redis

RUN = secrets.token_hex(4)
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"
DB_NAME = f"idap_test_{RUN}"
# Set before anything reads the settings (they are cached per process, and the worker inherits them).
os.environ.update({
    "IDAP_DATA_DIR": tempfile.mkdtemp(prefix=f"idap-service-{RUN}-"),
    "IDAP_DATABASE_URL": f"postgresql+psycopg://postgres@127.0.0.1:5432/{DB_NAME}",
    "IDAP_BROKER_URL": "redis://127.0.0.1:6379/11",
    "IDAP_CPU_QUEUE": f"test-{RUN}-cpu",
    "IDAP_GPU_QUEUE": f"test-{RUN}-gpu",
    "IDAP_WEBHOOK_QUEUE": f"test-{RUN}-webhooks",
    "IDAP_WEBHOOK_ALLOW_PRIVATE": "true",
    "IDAP_WEBHOOK_RETRY_SCHEDULE_S": "[0.5, 0.5]",
    "IDAP_WEBHOOK_TIMEOUT_S": "5",
    "IDAP_HEARTBEAT_INTERVAL_S": "0.5",
    "IDAP_STALE_AFTER_S": "3",
    "IDAP_REAPER_INTERVAL_S": "1",
    "IDAP_RETRY_BACKOFF_S": "0.5",
    "IDAP_PROGRESS_INTERVAL_S": "0.2",
    "IDAP_MAX_UPLOAD_BYTES": str(2 * 1024 * 1024),
    "IDAP_REQUIRE_AUTH": "true",
})

from domain.settings import Settings, get_settings  # noqa: E402  (reads the environment set above)
from tests.service.helpers import start_worker, stop_worker  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def database() -> Iterator[str]:
    from domain.db import get_engine, upgrade

    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{DB_NAME}"')
    url = get_settings().database
    upgrade(url)
    yield url
    get_engine(url).dispose()
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{DB_NAME}" WITH (FORCE)')
    broker = redis.Redis.from_url(os.environ["IDAP_BROKER_URL"])
    for key in broker.scan_iter(f"*test-{RUN}-*"):
        broker.delete(key)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return get_settings()


@pytest.fixture(scope="session")
def worker(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real Celery worker process for the session; yields its log file."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    process = start_worker(settings, log)
    yield log
    stop_worker(process)


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

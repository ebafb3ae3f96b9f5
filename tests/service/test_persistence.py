"""Migrations against the models (Postgres and SQLite), the state machine, the reaper, and S3 storage."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from api.services.tenants import get_or_create_tenant
from domain import states
from domain.clock import utcnow
from domain.db import get_engine, session_scope, upgrade
from domain.models import Base, Job
from domain.queue import CeleryQueue
from domain.settings import Settings
from domain.states import JobStatus
from domain.storage import S3Storage, file_digest, open_storage
from worker.lease import reap_stale_jobs


def assert_schema_matches_models(url: str) -> None:
    with get_engine(url).connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
        tables = set(inspect(connection).get_table_names())
    assert diff == []
    assert set(Base.metadata.tables) <= tables


def test_migrations_match_the_models_on_postgres(database: str) -> None:
    # the session's database was created empty and migrated by `upgrade`, as `idap db upgrade` does
    assert_schema_matches_models(database)


def test_migrations_match_the_models_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'fresh' / 'idap.db'}"
    upgrade(url)
    assert_schema_matches_models(url)


def _job(settings: Settings, **fields: object) -> str:
    with session_scope(settings.database) as session:
        tenant, _ = get_or_create_tenant(session, "state-tests")
        # the GPU queue: no test worker consumes it, so a requeued job stays put
        job = Job(tenant_id=tenant.id, queue=settings.gpu_queue, config={}, model_key="k", data_key="k",
                  max_attempts=2, **fields)
        session.add(job)
    return job.id


def test_transitions_are_checked_in_one_place(database: str, settings: Settings) -> None:
    job_id = _job(settings)
    with session_scope(database) as session:
        assert not states.transition(session, job_id, JobStatus.SUCCEEDED), "queued cannot jump to succeeded"
        assert states.transition(session, job_id, JobStatus.RUNNING)
        assert states.transition(session, job_id, JobStatus.SUCCEEDED)
        assert not states.transition(session, job_id, JobStatus.CANCELLED), "finished jobs stay finished"
        job = session.get(Job, job_id)
        session.refresh(job)
        assert job.status == JobStatus.SUCCEEDED and job.finished_at is not None


def test_reaper_requeues_a_lost_job_and_fails_a_poison_one(database: str, settings: Settings) -> None:
    stale = utcnow() - timedelta(seconds=settings.stale_after_s * 10)
    lost = _job(settings, status=JobStatus.RUNNING, attempts=1, heartbeat_at=stale)
    poison = _job(settings, status=JobStatus.RUNNING, attempts=2, heartbeat_at=stale)
    alive = _job(settings, status=JobStatus.RUNNING, attempts=1, heartbeat_at=utcnow())
    failed = reap_stale_jobs(settings, CeleryQueue(settings))
    assert poison in failed and lost not in failed
    with session_scope(database) as session:
        status = {job_id: session.get(Job, job_id) for job_id in (lost, poison, alive)}
        assert status[lost].status == JobStatus.QUEUED
        assert status[poison].status == JobStatus.FAILED and status[poison].error["code"] == "worker_lost"
        assert status[alive].status == JobStatus.RUNNING


def test_s3_storage_against_moto(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moto.server import ThreadedMotoServer

    for name, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(name, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        storage = open_storage("s3://bucket/some/prefix", endpoint)
        assert isinstance(storage, S3Storage)
        storage.client.create_bucket(Bucket="bucket")
        source = tmp_path / "model.onnx"
        source.write_bytes(b"onnx" * 300_000)
        storage.put_file("jobs/1/artifacts/model.onnx", source)
        storage.put_file("jobs/2/artifacts/model.onnx", source)
        assert b"".join(storage.iter_bytes("jobs/1/artifacts/model.onnx")) == source.read_bytes()
        storage.get_file("jobs/1/artifacts/model.onnx", tmp_path / "back")
        assert file_digest(tmp_path / "back") == file_digest(source)
        storage.delete_prefix("jobs/1")
        keys = [item["Key"] for item in storage.client.list_objects_v2(Bucket="bucket").get("Contents", [])]
        assert keys == ["some/prefix/jobs/2/artifacts/model.onnx"]
    finally:
        server.stop()


def test_local_storage_keeps_keys_inside_its_root(tmp_path: Path) -> None:
    storage = open_storage(str(tmp_path / "root"))
    with pytest.raises(ValueError):
        storage.put_file("../outside", tmp_path)

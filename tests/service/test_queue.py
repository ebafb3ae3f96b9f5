"""GET /v1/queue, the idap_workers_live gauges and the jobs page's GPU worker count, against a
database of their own (the session's has the other tests' workers and jobs), with the workers' rows
as workers write them; and which `device` a job may ask for when GPU workers are pinned."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.services.tenants import create_key, get_or_create_tenant
from domain.clock import utcnow
from domain.db import session_scope, upgrade
from domain.models import Job, Worker
from domain.settings import Settings
from domain.states import JobStatus
from domain.workers import device_problem, report_worker
from tests.service.helpers import auth


@pytest.fixture
def own(settings: Settings, tmp_path: Path) -> Settings:
    own = settings.model_copy(update={"database_url": f"sqlite:///{tmp_path / 'queue.db'}"})
    upgrade(own.database)
    return own


def _key(settings: Settings) -> str:
    with session_scope(settings.database) as session:
        tenant, _ = get_or_create_tenant(session, "queue-tests")
        key = create_key(session, tenant)
        for status, queue in ((JobStatus.QUEUED, settings.gpu_queue), (JobStatus.QUEUED, settings.gpu_queue),
                              (JobStatus.QUEUED, settings.cpu_queue), (JobStatus.RUNNING, settings.gpu_queue),
                              (JobStatus.SUCCEEDED, settings.cpu_queue)):
            session.add(Job(tenant_id=tenant.id, status=status, queue=queue, config={}, model_key="k", data_key="k",
                            max_attempts=1))
    return key


def _workers(settings: Settings) -> None:
    """Two workers pinned to GPUs 0 and 1 (each sees its GPU alone), a CPU worker, a webhook worker, a
    `idap serve` worker on a machine without CUDA (both job queues), a GPU worker gone quiet long ago and
    one that stopped reporting a minute ago (not live, but its devices still count for the device check)."""
    jobs = [settings.cpu_queue, settings.gpu_queue]
    report_worker(settings, "gpu0@box", jobs, 1, 0)
    report_worker(settings, "gpu1@box", jobs, 1, 1)
    report_worker(settings, "celery@cpu-box", [settings.cpu_queue], 0)
    report_worker(settings, "jobs@laptop", jobs, 0)
    report_worker(settings, "webhooks@box", [settings.webhook_queue], 0)
    old = utcnow() - timedelta(seconds=settings.device_report_ttl_s + 60)
    with session_scope(settings.database) as session:
        session.add(Worker(name="gpu2@box", queues=jobs, cuda_devices=1, pinned_gpu=2, started_at=old, seen_at=old))
        quiet = utcnow() - timedelta(seconds=settings.worker_live_s + 30)
        session.add(Worker(name="gpu3@box", queues=jobs, cuda_devices=1, pinned_gpu=3, started_at=quiet,
                           seen_at=quiet))


def test_the_queue_counts_live_workers_by_kind_and_names_the_pinned_gpus(own: Settings) -> None:
    key = _key(own)
    _workers(own)
    with TestClient(create_app(own)) as client:
        assert client.get("/v1/queue").status_code == 401
        queue = client.get("/v1/queue", headers=auth(key)).json()
        metrics = client.get("/metrics", headers=auth(own.metrics_token or "")).text
        jobs_page = client.get("/ui/jobs", headers=auth(key)).text
        documented = client.get("/openapi.json", headers=auth(key)).json()
    assert queue["queued"] == 3 and queue["running"] == 1
    assert queue["queued_by_queue"] == {own.gpu_queue: 2, own.cpu_queue: 1}
    assert queue["workers_live"] == 5 and queue["gpu_workers_live"] == 2
    assert queue["workers_by_kind"] == {"cpu": 2, "gpu": 2, "webhooks": 1}
    assert queue["gpus"] == [0, 1], "the stale workers' GPUs 2 and 3 are not live"
    workers = {worker["name"]: worker for worker in queue["workers"]}
    assert sorted(workers) == ["celery@cpu-box", "gpu0@box", "gpu1@box", "jobs@laptop", "webhooks@box"]
    assert workers["gpu1@box"]["kind"] == "gpu" and workers["gpu1@box"]["pinned_gpu"] == 1
    assert workers["jobs@laptop"]["kind"] == "cpu", "the gpu queue without CUDA runs jobs on the CPU"
    assert workers["celery@cpu-box"]["pinned_gpu"] is None
    for kind, count in (("gpu", 2), ("cpu", 2), ("webhooks", 1)):
        assert f'idap_workers_live{{kind="{kind}"}} {count}.0' in metrics
    assert "2 GPU workers live" in jobs_page
    assert "/v1/queue" in documented["paths"]
    assert documented["paths"]["/v1/queue"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]


def test_with_workers_pinned_to_one_gpu_each_a_job_asks_for_cuda(own: Settings) -> None:
    """Any GPU worker may take a job from the gpu queue, so cuda:N needs device N on every live one; a
    worker with no CUDA device (on the gpu queue or not) and a stale one with more do not count."""
    with session_scope(own.database) as session:
        assert "No worker reports a CUDA device" in (device_problem(session, own, "cuda") or "")
    _workers(own)
    old = utcnow() - timedelta(seconds=own.device_report_ttl_s + 60)
    with session_scope(own.database) as session:
        session.add(Worker(name="celery@old-box", queues=[own.gpu_queue], cuda_devices=4, started_at=old, seen_at=old))
    with session_scope(own.database) as session:
        assert device_problem(session, own, "cuda") is None
        assert device_problem(session, own, "cuda:0") is None
        assert "ask for cuda" in (device_problem(session, own, "cuda:1") or "")
    report_worker(own, "gpu0@box", [own.gpu_queue], 2)  # unpinned now, seeing two GPUs: gpu1@box still sees one
    report_worker(own, "gpu1@box", [own.gpu_queue], 2)  # ... and gpu3@box, restarting, was last seen with one
    with session_scope(own.database) as session:
        assert "cuda:0 to cuda:0" in (device_problem(session, own, "cuda:1") or "")

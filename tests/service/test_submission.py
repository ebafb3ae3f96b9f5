"""The submission path under load and against hostile files: concurrent submissions and preflights
(no 5xx, the jobs that exist match the answers, polls stay fast), no database connection held while
an upload streams or a sandbox checks it, a broker outage at submit (a queued job, sent when the
broker is back), overload answered 429/503 with Retry-After, and uploads that bomb, crash or outlast
their sandbox (a 422, the API alive and its memory unmoved)."""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import make_url, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from api.app import create_app
from api.services.tenants import create_key, get_or_create_tenant
from benchmarks.load import BUSY_PICKLE, CRASHING_PICKLE, PICKLE_BOMB, free_port, rss_mb, write_npz_bomb, write_pickle
from domain.db import get_engine, session_scope, upgrade
from domain.models import JobDispatch
from domain.settings import Settings
from tests.service.helpers import FAST, LiveServer, auth, finished, start_worker, stop_worker, submit, wait_for

INSPECT = {"architecture": "idap:digits", "target": {"macs_reduction": 0.3}}
SUBMIT = FAST | {"architecture": "idap:digits"}
# Jobs on the GPU queue, which no test worker consumes, stay queued.
PARKED = SUBMIT | {"device": "cuda"}


def new_key(database: str, name: str) -> str:
    with session_scope(database) as session:
        tenant, _ = get_or_create_tenant(session, f"{name}-{secrets.token_hex(4)}")
        return create_key(session, tenant)


def post(client: httpx.Client | TestClient, path: str, model: Path, data: Path, config: dict[str, Any]) -> Any:
    """The files and config as a form, with the client's own headers (its key)."""
    return client.post(path, data={"config": json.dumps(config)},
                       files={"model": (model.name, model.read_bytes()), "data": (data.name, data.read_bytes())})


def api_rss_mb() -> float:
    return rss_mb(os.getpid())  # the app under test runs in this process


def p(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[LiveServer]:
    with LiveServer(settings) as live:
        yield live


def test_a_burst_of_submissions_and_preflights_keeps_polls_fast_and_jobs_matching_answers(
        server: LiveServer, settings: Settings, digits: tuple[Path, Path]) -> None:
    key = new_key(settings.database, "burst")
    model, data = digits
    with httpx.Client(base_url=server.url, headers=auth(key), timeout=300) as client:
        first = post(client, "/v1/jobs", model, data, PARKED)
        assert first.status_code == 202, first.text
        polled = first.json()["id"]
    polls: list[float] = []
    poll_statuses: list[int] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=server.url, headers=auth(key), timeout=60) as client:
            while not stop.is_set():
                started = time.perf_counter()
                poll_statuses.append(client.get(f"/v1/jobs/{polled}").status_code)
                polls.append(time.perf_counter() - started)
                time.sleep(0.01)

    def one(path: str) -> Any:
        with httpx.Client(base_url=server.url, headers=auth(key), timeout=300) as client:
            return post(client, path, model, data, PARKED if path == "/v1/jobs" else INSPECT)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        with ThreadPoolExecutor(30) as pool:
            responses = list(pool.map(one, ["/v1/jobs"] * 20 + ["/v1/inspect"] * 10))
    finally:
        stop.set()
        poller.join()
    assert [r.status_code for r in responses] == [202] * 20 + [200] * 10, [r.text for r in responses if r.is_error]
    assert set(poll_statuses) == {200}
    accepted = {r.json()["id"] for r in responses[:20]}
    with httpx.Client(base_url=server.url, headers=auth(key), timeout=60) as client:
        jobs = client.get("/v1/jobs", params={"limit": 200}).json()["jobs"]
        assert {job["id"] for job in jobs} == accepted | {polled}, "a job exists exactly for each 202"
        for job in jobs:
            client.post(f"/v1/jobs/{job['id']}/cancel")
    # 2 CPUs shared by 30 uploading threads, the API and 2 sandboxes: loose bounds (the issue saw 14 s)
    assert len(polls) > 20 and p(polls, 50) < 0.2 and p(polls, 95) < 1.0, sorted(polls)[-5:]


class PartialUpload:
    """A POST whose body stops half way (the server waits for the rest), until `close`."""

    def __init__(self, url: str, path: str, key: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.sock = socket.create_connection((host, int(port)))
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                "Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 100000\r\n\r\n")
        self.sock.sendall(head.encode() + b'--xyz\r\nContent-Disposition: form-data; name="model"; '
                          b'filename="m.onnx"\r\n\r\n' + b"\x08" * 1000)

    def close(self) -> None:
        with suppress(OSError):
            self.sock.close()


def connections_in_use(database: str, seconds: float = 1.0) -> int:
    """The fewest connections of the pool checked out over `seconds` (another app's relay may hold one
    for a moment; a request holding one would hold it all along)."""
    pool = get_engine(database).pool
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        samples.append(pool.checkedout())  # type: ignore[attr-defined]
        time.sleep(0.05)
    return min(samples)


def test_no_connection_is_held_while_an_upload_streams_or_a_sandbox_works_and_overload_is_a_429(
        settings: Settings, digits: tuple[Path, Path], tmp_path: Path) -> None:
    own = settings.model_copy(update={"inspect_max_pending": 1, "allow_pickle": True})
    key = new_key(settings.database, "overload")
    model, data = digits
    sleeper = write_pickle(tmp_path / "sleeper.pt", "import time; time.sleep(4)")
    with LiveServer(own) as live, httpx.Client(base_url=live.url, headers=auth(key), timeout=60) as client:
        upload = PartialUpload(live.url, "/v1/inspect", key)
        try:
            time.sleep(0.5)
            assert connections_in_use(settings.database) == 0
            busy = post(client, "/v1/jobs", model, data, SUBMIT)
            assert busy.status_code == 429, busy.text
            assert busy.json()["error"]["code"] == "too_many_uploads" and int(busy.headers["retry-after"]) > 0
        finally:
            upload.close()
        deadline = time.monotonic() + 60
        while (warm := post(client, "/v1/inspect", model, data, INSPECT)).status_code == 429:  # until it sees the close
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert warm.status_code == 200, warm.text
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(post, client, "/v1/inspect", sleeper, data, {"target": {"macs_reduction": 0.3}})
            time.sleep(1.5)  # the sandbox is unpickling (sleeping)
            assert connections_in_use(settings.database) == 0
            assert post(client, "/v1/inspect", model, data, INSPECT).status_code == 429
            assert slow.result().status_code == 422  # a sleeping pickle is no model


def test_an_exhausted_or_unreachable_database_is_a_503_with_retry_after(
        client: TestClient, keys: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for error, code in ((PoolTimeout("QueuePool limit of size 5 overflow 10 reached"), "server_busy"),
                        (OperationalError("SELECT 1", {}, Exception("connection refused")), "database_unavailable")):
        def fail(*_args: Any, error: Exception = error) -> None:
            raise error

        monkeypatch.setattr("api.auth.tenant_for_key", fail)
        response = client.get("/v1/jobs", headers=auth(keys["a"]))
        assert response.status_code == 503 and response.json()["error"]["code"] == code, response.text
        assert int(response.headers["retry-after"]) > 0


class Forwarder:
    """A loopback port that refuses connections until `open`, then forwards them to `target`: a broker
    that is down, then back at the same address."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.port, self.target = free_port(), target
        self.listener: socket.socket | None = None

    def open(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                near, _ = listener.accept()
            except OSError:
                return
            far = socket.create_connection(self.target)
            for source, sink in ((near, far), (far, near)):
                threading.Thread(target=_pipe, args=(source, sink), daemon=True).start()


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with suppress(OSError):
        while chunk := source.recv(1 << 16):
            sink.sendall(chunk)
    for end in (source, sink):
        with suppress(OSError):
            end.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def outage(settings: Settings) -> Iterator[tuple[Settings, Forwarder]]:
    """Settings on a database of their own (no other app's relay sees its jobs) and a broker address
    that is down until the Forwarder opens; the queues are this test's."""
    session_database = make_url(settings.database)
    name = f"{session_database.database}_outage"
    # CREATE and DROP DATABASE, from a connection to the session's database
    admin_url = session_database.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    host, port = settings.broker.removeprefix("redis://").split("/")[0].split(":")
    broker = Forwarder((host, int(port)))
    own = settings.model_copy(update={
        "database_url": session_database.set(database=name).render_as_string(hide_password=False),
        "broker_url": f"redis://127.0.0.1:{broker.port}/11", "cpu_queue": f"{settings.cpu_queue}-outage",
        "dispatch_interval_s": 0.3})
    upgrade(own.database)
    try:
        yield own, broker
    finally:
        broker.close()
        get_engine(own.database).dispose()
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_job_accepted_while_the_broker_is_down_runs_once_it_is_back(
        outage: tuple[Settings, Forwarder], settings: Settings, digits: tuple[Path, Path], tmp_path: Path) -> None:
    own, broker = outage
    key = new_key(own.database, "outage")
    config = {"idempotency_key": "during-the-outage"}
    with TestClient(create_app(own)) as client:
        response = submit(client, key, digits, config)
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]
        deadline = time.monotonic() + 20
        while True:  # the relay tried, failed, and keeps the job's dispatch
            with session_scope(own.database) as session:
                dispatch = session.scalar(select(JobDispatch).where(JobDispatch.job_id == job_id))
            assert dispatch is not None
            if dispatch.tries >= 2:
                break
            assert time.monotonic() < deadline, "the relay did not try to send the job"
            time.sleep(0.2)
        assert "connecting" in (dispatch.last_error or ""), dispatch.last_error
        again = submit(client, key, digits, config)
        assert again.status_code == 200 and again.json()["id"] == job_id and again.json()["status"] == "queued"
        assert [job["id"] for job in client.get("/v1/jobs", headers=auth(key)).json()["jobs"]] == [job_id]

        worker = start_worker(own.model_copy(update={"broker_url": settings.broker}), tmp_path / "worker.log",
                              queues=own.cpu_queue)
        try:
            broker.open()
            job = wait_for(client, key, job_id, finished, timeout=120)
        finally:
            stop_worker(worker)
        assert job["status"] == "succeeded" and job["attempts"] == 1, job
        with session_scope(own.database) as session:
            assert session.scalar(select(JobDispatch).where(JobDispatch.job_id == job_id)) is None


@pytest.fixture(scope="module")
def hostile_client(settings: Settings, keys: dict[str, str]) -> Iterator[TestClient]:
    """Pickles allowed (so they reach their loader), tight sandbox limits, uploads up to 16 MiB."""
    own = settings.model_copy(update={"allow_pickle": True, "inspect_memory_bytes": 768 << 20, "inspect_cpu_s": 3,
                                      "inspect_timeout_s": 60, "max_upload_bytes": 16 << 20, "inspect_workers": 1})
    with TestClient(create_app(own), headers=auth(keys["a"])) as client:
        yield client


def test_an_npz_bomb_is_refused_from_its_header_without_inflating(
        hostile_client: TestClient, digits: tuple[Path, Path], tmp_path: Path) -> None:
    bomb = write_npz_bomb(tmp_path / "bomb.npz")  # 9.4 MB on disk, 2 GiB inflated, 1,048,576 samples
    model, _ = digits
    before = api_rss_mb()
    started = time.monotonic()
    response = post(hostile_client, "/v1/inspect", model, bomb, INSPECT)
    assert response.status_code == 422 and response.json()["error"]["code"] == "too_many_samples", response.text
    # the sandbox reads the array's header only: no time, and nothing near the 768 MiB it may use
    assert time.monotonic() - started < 20
    assert api_rss_mb() - before < 50


@pytest.mark.parametrize(("code", "expected"), [
    (PICKLE_BOMB, {"invalid_file", "inspection_out_of_memory"}),  # MemoryError at the sandbox's limit
    (CRASHING_PICKLE, {"inspection_crashed"}),
    (BUSY_PICKLE, {"inspection_timeout"}),  # SIGXCPU after 3 s of CPU
], ids=["pickle-bomb", "segfault", "busy-loop"])
def test_a_hostile_pickle_crashes_only_its_sandbox(hostile_client: TestClient, digits: tuple[Path, Path],
                                                   tmp_path: Path, code: str, expected: set[str]) -> None:
    model, data = digits
    before = api_rss_mb()
    response = post(hostile_client, "/v1/inspect", write_pickle(tmp_path / "model.pt", code), data, {})
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] in expected and error["hint"], error
    assert api_rss_mb() - before < 50
    # the API is up, and a sandbox (a new one where the last died) checks the next upload
    assert hostile_client.get("/healthz").status_code == 200
    again = post(hostile_client, "/v1/inspect", model, data, INSPECT)
    assert again.status_code == 200, again.text

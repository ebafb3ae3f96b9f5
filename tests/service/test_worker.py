"""Jobs run by a real Celery worker: events, artifacts checked with ONNX Runtime, signed webhooks
with a retry, cancel, and a worker killed mid-job."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import select
from standardwebhooks import Webhook

from api.app import create_app
from api.cli import pinned_environment, supervise
from core.report import Report
from domain.db import session_scope
from domain.models import Job, JobEvent, Worker
from domain.queue import CeleryQueue
from domain.settings import Settings
from tests.service.helpers import ROOT, Receiver, auth, finished, start_worker, stop_worker, submit, wait_for

# Long enough to be caught running (a few seconds), short enough for the suite.
SLOW_RECOVERY = {"recovery": {"recovery_iterations": 150, "final_recovery_iterations": 150}}


def read_events(client: TestClient, key: str, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    events = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=auth(key)) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((kind, json.loads(line.removeprefix("data: "))))
    return events


def test_job_runs_end_to_end(client: TestClient, keys: dict[str, str], digits: tuple[Path, Path], worker: Path,
                             settings: Settings) -> None:
    with Receiver(fail_first=1) as receiver:
        response = submit(client, keys["a"], digits, {"webhook_url": receiver.url})
        assert response.status_code == 202, response.text
        job_id = response.json()["id"]

        events = read_events(client, keys["a"], job_id)  # returns once the job has finished
        statuses = [data["status"] for kind, data in events if kind == "status"]
        assert statuses == ["running", "succeeded"], events
        stages = {data["stage"] for kind, data in events if kind == "progress"}
        assert {"baseline", "export", "done"} <= stages
        # the run's progress carries its elapsed time, and an ETA once a step has been measured
        run = [data for kind, data in events if kind == "progress" and data["stage"] not in ("queued", "starting")]
        assert all(isinstance(data["elapsed_s"], float) for data in run)
        assert run[-1]["stage"] == "done" and run[-1]["eta_s"] is not None

        job = client.get(f"/v1/jobs/{job_id}", headers=auth(keys["a"])).json()
        assert job["status"] == "succeeded" and job["attempts"] == 1 and job["error"] is None
        assert job["progress"]["fraction"] == 1.0
        assert job["metrics"]["macs_after"] < job["metrics"]["macs_before"]
        assert job["started_at"] and job["finished_at"]
        artifacts = {artifact["name"]: artifact for artifact in job["artifacts"]}
        assert {"model.onnx", "report.json"} <= set(artifacts)

        onnx = client.get(f"/v1/jobs/{job_id}/artifacts/model.onnx", headers=auth(keys["a"]))
        assert onnx.status_code == 200
        assert int(onnx.headers["content-length"]) == artifacts["model.onnx"]["size"] == len(onnx.content)
        assert hashlib.sha256(onnx.content).hexdigest() == artifacts["model.onnx"]["sha256"]
        assert onnx.headers["x-checksum-sha256"] == artifacts["model.onnx"]["sha256"]
        session = ort.InferenceSession(onnx.content, providers=["CPUExecutionProvider"])
        with np.load(digits[1]) as data:
            x = data["x"][:8].astype(np.float32)
        logits = session.run(None, {session.get_inputs()[0].name: x})[0]
        assert logits.shape == (8, 10)
        report = client.get(f"/v1/jobs/{job_id}/artifacts/report.json", headers=auth(keys["a"])).json()
        assert report["macs_after"] == job["metrics"]["macs_after"]
        # the typed report: what core wrote, served as the schema OpenAPI documents; the job's metrics are its headline
        typed = client.get(f"/v1/jobs/{job_id}/report", headers=auth(keys["a"]))
        assert typed.status_code == 200 and typed.json() == report
        assert Report.model_validate(typed.json()).headline().model_dump(mode="json") == job["metrics"]
        assert client.get(f"/v1/jobs/{job_id}/report", headers=auth(keys["b"])).status_code == 404
        assert client.get(f"/v1/jobs/{job_id}/artifacts/model.onnx", headers=auth(keys["b"])).status_code == 404
        assert client.get(f"/v1/jobs/{job_id}/artifacts/../x", headers=auth(keys["a"])).status_code == 404

        # job.started failed once (500) and was retried; every request carries a valid signature
        deadline = time.monotonic() + 30
        while len(receiver.requests) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        verifier = Webhook(keys["a_secret"])
        received = [verifier.verify(body, headers) for headers, body in receiver.requests]
        assert sorted(event["type"] for event in received) == ["job.started", "job.started", "job.succeeded"]
        succeeded = next(event for event in received if event["type"] == "job.succeeded")
        assert succeeded["data"]["id"] == job_id and succeeded["data"]["status"] == "succeeded"
        started_ids = {h["webhook-id"] for (h, _), event in zip(receiver.requests, received)
                       if event["type"] == "job.started"}
        assert len(started_ids) == 1, "a retry keeps the webhook-id, so receivers can deduplicate"
        deliveries = client.get(f"/v1/jobs/{job_id}/webhooks", headers=auth(keys["a"])).json()["deliveries"]
        assert sorted((d["event_type"], d["attempt"], d["status_code"], d["will_retry"]) for d in deliveries) == [
            ("job.started", 1, 500, True), ("job.started", 2, 204, False), ("job.succeeded", 1, 204, False)]
        # the webhook worker retried on schedule while the job worker was busy with the job
        when = {(d["event_type"], d["attempt"]): datetime.fromisoformat(d["created_at"]) for d in deliveries}
        retry = (when[("job.started", 2)] - when[("job.started", 1)]).total_seconds()
        assert settings.webhook_retry_schedule_s[0] <= retry < settings.webhook_retry_schedule_s[0] + 2.5, retry
        assert when[("job.started", 2)] < datetime.fromisoformat(job["finished_at"])

    metrics = client.get("/metrics", headers=auth(settings.metrics_token or "")).text
    assert 'idap_jobs{status="succeeded"}' in metrics and "idap_webhook_failures_total 1.0" in metrics
    assert "idap_job_duration_seconds_count" in metrics

    stored = settings.data_dir / "artifacts" / "jobs" / job_id
    assert (stored / "artifacts" / "model.onnx").is_file()
    assert client.delete(f"/v1/jobs/{job_id}", headers=auth(keys["a"])).status_code == 204
    assert not stored.exists()


def test_a_job_runs_the_task_its_config_names_and_reports_in_its_metric(
        client: TestClient, keys: dict[str, str], digits: tuple[Path, Path], worker: Path) -> None:
    """The digits' class ids serve as an embedding's group ids: the job measures retrieval recall@10."""
    response = submit(client, keys["a"], digits, {"task": "embedding"})
    assert response.status_code == 202, response.text
    job = wait_for(client, keys["a"], response.json()["id"], finished)
    assert job["status"] == "succeeded", job["error"]
    metrics = job["metrics"]
    assert (metrics["task"], metrics["accuracy_metric"]) == ("embedding", "recall_at_10")
    assert metrics["budget"] == "retrieval recall@10 may drop by at most 2.00 points"
    report = client.get(f"/v1/jobs/{job['id']}/report", headers=auth(keys["a"])).json()
    assert report["options"]["task"] == "embedding" and report["target"]["max_accuracy_drop"] == 0.02
    assert any(note.startswith("Task: embedding (as chosen)") for note in report["notes"]), report["notes"]


def test_cancel_a_running_job(client: TestClient, keys: dict[str, str], digits: tuple[Path, Path],
                              worker: Path) -> None:
    job_id = submit(client, keys["a"], digits, SLOW_RECOVERY).json()["id"]
    wait_for(client, keys["a"], job_id, lambda job: job["status"] == "running" or finished(job))
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(keys["a"]))
    assert response.status_code == 202 and response.json()["cancel_requested"]
    job = wait_for(client, keys["a"], job_id, finished)
    assert job["status"] == "cancelled" and job["artifacts"] == []


def _running(settings: Settings, job_id: str) -> tuple[int, str | None]:
    """The job's last checkpointed step and the process running it."""
    with session_scope(settings.database) as session:
        job = session.get(Job, job_id)
        return job.checkpoint_step or 0, job.worker


def test_a_job_whose_worker_dies_resumes_from_its_checkpoint(keys: dict[str, str], digits: tuple[Path, Path],
                                                             settings: Settings, tmp_path: Path) -> None:
    """kill -9 the worker mid-job: the other worker takes the job over as attempt 2 within the stale
    period, from the last accepted step's checkpoint, and the killed attempt's scratch files go."""
    own = settings.model_copy(update={"cpu_queue": settings.cpu_queue + "-kill", "scratch_dir": tmp_path / "scratch"})
    config = {"target": {"macs_reduction": 0.6, "max_accuracy_drop": 1.0}, "stages": ["filters"],
              "recovery": {"recovery_iterations": 40, "final_recovery_iterations": 5}}
    workers = {}
    try:
        for name in ("first", "second"):
            process = start_worker(own, tmp_path / f"{name}.log")
            workers[process.pid] = process
        with TestClient(create_app(own)) as client:
            job_id = submit(client, keys["a"], digits, config).json()["id"]
            deadline = time.monotonic() + 120
            while (running := _running(own, job_id))[0] < 2:
                assert time.monotonic() < deadline, running
                time.sleep(0.05)
            checkpointed, holder = running
            assert list((tmp_path / "scratch").glob(f"job-{job_id}-*")), "the running attempt's scratch directory"
            killed = workers.pop(int(str(holder).rsplit(":", 1)[1]))
            os.kill(killed.pid, signal.SIGKILL)
            killed.wait()
            killed_at = time.monotonic()
            wait_for(client, keys["a"], job_id, lambda job: job["attempts"] == 2 or finished(job), timeout=60)
            taken_over = time.monotonic() - killed_at
            job = wait_for(client, keys["a"], job_id, finished, timeout=180)
            report = client.get(f"/v1/jobs/{job_id}/report", headers=auth(keys["a"])).json()
        assert job["status"] == "succeeded", job
        assert job["attempts"] == 2
        assert taken_over <= own.stale_after_s + 2 * own.reaper_interval_s + 3, taken_over
        with session_scope(own.database) as session:
            events = session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)).all()
            assert session.get(Job, job_id).checkpoint_key is None
        requeued = next(i for i, event in enumerate(events) if event.data.get("status") == "queued")
        completed = max(event.data["step"] for event in events[:requeued] if event.data.get("stage") == "filters")
        resumed = report["resumed_at_step"]
        assert resumed >= checkpointed >= 2 and resumed <= completed
        assert completed - resumed < completed, "fewer steps run again than the killed attempt completed"
        second_attempt = [event.data["step"] for event in events[requeued:] if event.data.get("stage") == "filters"]
        assert not second_attempt or min(second_attempt) == resumed + 1, "the steps up to the checkpoint stay done"
        assert not list((tmp_path / "scratch").glob("job-*")), "the killed attempt's scratch files were swept"
        assert not (own.data_dir / "artifacts" / "jobs" / job_id / "checkpoints").exists()
    finally:
        for process in workers.values():
            stop_worker(process)


def test_infrastructure_errors_are_retried_then_fail(keys: dict[str, str], digits: tuple[Path, Path],
                                                     settings: Settings, worker: Path) -> None:
    """Inputs gone from storage (an infrastructure fault): each attempt fails, the job ends failed."""
    parked = settings.model_copy(update={"cpu_queue": settings.cpu_queue + "-parked"})
    with TestClient(create_app(parked)) as client:
        job_id = submit(client, keys["a"], digits).json()["id"]
        shutil.rmtree(settings.data_dir / "artifacts" / "jobs" / job_id / "inputs")
        with session_scope(settings.database) as session:
            session.get(Job, job_id).queue = settings.cpu_queue
        CeleryQueue(settings).enqueue_job(job_id, settings.cpu_queue)
        job = wait_for(client, keys["a"], job_id, finished)
    assert job["status"] == "failed" and job["attempts"] == settings.max_attempts
    assert job["error"]["code"] == "internal_error" and "FileNotFoundError" in job["error"]["message"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a worker without CUDA")
def test_a_user_error_in_the_worker_fails_at_once(keys: dict[str, str], digits: tuple[Path, Path],
                                                  settings: Settings, worker: Path) -> None:
    """The preflight runs on the API's CPU, so a job asking for CUDA passes it; a CPU-only worker then
    raises the user's error, which no retry would fix."""
    with TestClient(create_app(settings)) as client:
        job_id = submit(client, keys["a"], digits, {"device": "cuda"}).json()["id"]  # parked on the GPU queue
        with session_scope(settings.database) as session:
            session.get(Job, job_id).queue = settings.cpu_queue
        CeleryQueue(settings).enqueue_job(job_id, settings.cpu_queue)
        job = wait_for(client, keys["a"], job_id, finished)
    assert job["status"] == "failed" and job["attempts"] == 1
    assert job["error"]["code"] == "invalid_options" and "CUDA" in job["error"]["message"]
    assert job["error"]["hint"]


def _environ(pid: int) -> dict[str, str]:
    pairs = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(pair.split("=", 1) for pair in pairs if "=" in pair)


def _children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _pinned_rows(settings: Settings, names: list[str], timeout: float = 90) -> dict[str, Worker]:
    deadline = time.monotonic() + timeout
    while True:
        with session_scope(settings.database) as session:
            rows = {row.name: row for row in session.scalars(select(Worker).where(Worker.name.in_(names)))}
            session.expunge_all()
        if len(rows) == len(names):
            return rows
        assert time.monotonic() < deadline, f"only {sorted(rows)} of {names} reported"
        time.sleep(0.3)


def test_gpu_pinned_workers_see_only_their_gpu_and_report_it(keys: dict[str, str], settings: Settings,
                                                             tmp_path: Path) -> None:
    """`idap worker --gpus 1` becomes one worker pinned to GPU 1; `--gpus 2,3` supervises one per GPU and
    stops them all on SIGTERM. No GPU here: CUDA sees none, but each pin is in its process's environment
    and its Worker row, and the queue lists it."""
    own = settings.model_copy(update={"cpu_queue": settings.cpu_queue + "-pinned",
                                      "gpu_queue": settings.gpu_queue + "-pinned"})
    env = own.child_environment() | {"OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "core", "worker", "--pool", "solo", "--gpus"]
    log = (tmp_path / "pinned.log").open("wb")
    single = subprocess.Popen([*argv, "1"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    several = subprocess.Popen([*argv, "2,3"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    names = [f"gpu{gpu}@{socket.gethostname()}" for gpu in (1, 2, 3)]
    try:
        rows = _pinned_rows(own, names)
        for gpu, name in zip((1, 2, 3), names):
            assert rows[name].pinned_gpu == gpu and rows[name].queues == sorted([own.cpu_queue, own.gpu_queue])
        pinned = {int(_environ(pid)["IDAP_WORKER_GPU"]): _environ(pid) for pid in [single.pid, *_children(several.pid)]}
        assert sorted(pinned) == [1, 2, 3]
        for gpu, environ in pinned.items():
            assert environ["CUDA_VISIBLE_DEVICES"] == str(gpu) and environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
        with TestClient(create_app(own)) as client:
            listed = {w["name"]: w for w in client.get("/v1/queue", headers=auth(keys["a"])).json()["workers"]}
        assert [listed[name]["pinned_gpu"] for name in names] == [1, 2, 3]
        children = _children(several.pid)
        several.send_signal(signal.SIGTERM)
        assert several.wait(timeout=60) == 0
        assert not [pid for pid in children if Path(f"/proc/{pid}").exists()], "its workers stopped with it"
        if not torch.cuda.is_available():
            assert "pinned to GPU 1, but CUDA sees no device" in (tmp_path / "pinned.log").read_text()
    finally:
        for process in (single, several):
            stop_worker(process)
        with session_scope(own.database) as session:  # the next tests' devices and queue counts are their own
            session.execute(Worker.__table__.delete().where(Worker.name.in_(names)))


def test_a_pinned_worker_in_a_container_counts_its_gpu_among_those_it_was_given() -> None:
    """Compose's device_ids ["2"] has the NVIDIA runtime set NVIDIA_VISIBLE_DEVICES=2, and CUDA there
    calls that GPU 0: a worker pinned to GPU 2 must not hide it with CUDA_VISIBLE_DEVICES=2."""
    assert pinned_environment(2, {})["CUDA_VISIBLE_DEVICES"] == "2"
    assert pinned_environment(2, {"NVIDIA_VISIBLE_DEVICES": "all"})["CUDA_VISIBLE_DEVICES"] == "2"
    assert pinned_environment(2, {"NVIDIA_VISIBLE_DEVICES": "2"})["CUDA_VISIBLE_DEVICES"] == "0"
    assert pinned_environment(2, {"NVIDIA_VISIBLE_DEVICES": "3,2"})["CUDA_VISIBLE_DEVICES"] == "0"
    assert pinned_environment(3, {"NVIDIA_VISIBLE_DEVICES": "3,2"})["IDAP_WORKER_GPU"] == "3"
    uuids = {"NVIDIA_VISIBLE_DEVICES": "GPU-6f1c0d2e-aaaa-bbbb-cccc-0123456789ab,GPU-7e2d1c3f-aaaa-bbbb-cccc-01234567"}
    assert pinned_environment(1, uuids)["CUDA_VISIBLE_DEVICES"] == "1", "the container's own numbers"
    with pytest.raises(SystemExit, match="GPU 1 is not among this container's GPUs"):
        pinned_environment(1, {"NVIDIA_VISIBLE_DEVICES": "0"})


def test_when_one_pinned_worker_ends_the_supervisor_stops_the_others_and_fails(tmp_path: Path) -> None:
    """So that a restart policy brings the whole set back (stand-in processes: what matters is the exits)."""
    pid_file = tmp_path / "sleeper.pid"
    sleeper = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
                                     "time.sleep(120)"]
    dying = [sys.executable, "-c", "import time; time.sleep(1); raise SystemExit(3)"]
    before = signal.getsignal(signal.SIGTERM)
    try:
        assert supervise({0: (sleeper, dict(os.environ)), 1: (dying, dict(os.environ))}) == 1
    finally:
        signal.signal(signal.SIGTERM, before)
    assert not Path(f"/proc/{pid_file.read_text()}").exists(), "the other worker was stopped"

"""`idap serve`: the whole service from one command, with no external server (SQLite, a SQLite-backed
broker, local artifacts, a job worker and a webhook worker) runs the digits job, through a restart of
the whole service mid-job, and stops its workers on exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
from sqlalchemy import create_engine, text

from benchmarks.load import free_port
from tests.service.helpers import ROOT, wait_ready


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def start_serve(data_dir: Path, port: int, log: Path, **variables: str) -> subprocess.Popen[bytes]:
    """`idap serve` on `port` in a session of its own (so that a test can kill it with its workers and
    start it again on the same port), once it is ready."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("IDAP_")}
    serve = subprocess.Popen([sys.executable, "-m", "core", "serve", "--port", str(port), "--data-dir", str(data_dir)],
                             cwd=ROOT, env=env | {"OMP_NUM_THREADS": "1"} | variables, stdout=log.open("ab"),
                             stderr=subprocess.STDOUT, start_new_session=True)
    wait_ready(serve, f"http://127.0.0.1:{port}", log)
    return serve


def submit_digits(base: str, digits: tuple[Path, Path], config: dict[str, object]) -> str:
    model, data = digits
    # the upload is checked by a sandbox that may still be starting (importing torch) on a busy machine
    response = httpx.post(f"{base}/v1/jobs", data={"config": json.dumps({"architecture": "idap:digits", **config})},
                          timeout=120,
                          files={"model": (model.name, model.read_bytes()), "data": (data.name, data.read_bytes())})
    assert response.status_code == 202, response.text
    return base + response.headers["location"]


def test_idap_serve_runs_a_job_through_a_restart(digits: tuple[Path, Path], tmp_path: Path) -> None:
    """The whole service from one command runs a job; killed with its workers (kill -9) mid-job and
    started again, it resumes the job from its checkpoint and finishes it; SIGTERM stops its workers."""
    port, log, data_dir = free_port(), tmp_path / "serve.log", tmp_path / "data"
    quick = {"IDAP_HEARTBEAT_INTERVAL_S": "0.5", "IDAP_STALE_AFTER_S": "3", "IDAP_REAPER_INTERVAL_S": "1",
             "IDAP_SCRATCH_DIR": str(tmp_path / "scratch")}
    base = f"http://127.0.0.1:{port}"
    serve = start_serve(data_dir, port, log, **quick)
    try:
        assert "API key" in log.read_text(), "the first start shows the local key"
        job_url = submit_digits(base, digits, {
            "target": {"macs_reduction": 0.6, "max_accuracy_drop": 1.0}, "stages": ["filters"], "device": "cpu",
            "recovery": {"recovery_iterations": 40, "final_recovery_iterations": 5}})
        engine = create_engine(f"sqlite:///{data_dir / 'idap.db'}")
        deadline = time.monotonic() + 120
        while not engine.connect().execute(text("SELECT checkpoint_step FROM jobs")).scalar():
            assert time.monotonic() < deadline and httpx.get(job_url).json()["status"] in ("queued", "running")
            time.sleep(0.1)
        engine.dispose()
    finally:
        os.killpg(serve.pid, signal.SIGKILL)
        serve.wait()
    assert list((tmp_path / "scratch").glob("job-*")), "the killed attempt left its scratch directory"
    serve = start_serve(data_dir, port, log, **quick)
    try:
        deadline = time.monotonic() + 120
        while (job := httpx.get(job_url).json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        assert job["status"] == "succeeded" and job["attempts"] == 2, job
        assert httpx.get(f"{job_url}/report").json()["resumed_at_step"] >= 1
        assert not list((tmp_path / "scratch").glob("job-*")), "swept when the new workers started"
        onnx = httpx.get(f"{job_url}/artifacts/model.onnx")
        assert onnx.status_code == 200 and len(onnx.content) == int(onnx.headers["content-length"]) > 0
        worker_pids = children(serve.pid)
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes() for pid in worker_pids]
        assert sum(b"celery" in command for command in commands) == 2, "a job worker and a webhook worker"
        assert sum(b"api.services.inspector" in command for command in commands) >= 1, "the upload sandboxes"
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
    for pid in worker_pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]

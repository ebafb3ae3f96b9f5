"""`idap serve`: the whole service from one command, with no external server (SQLite, a SQLite-backed
broker, local artifacts, a worker subprocess) runs the digits job and stops its worker on exit."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import httpx

from tests.service.helpers import FAST, start_serve, wait_ready


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def test_idap_serve_runs_a_job(digits: tuple[Path, Path], tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    serve, base = start_serve(tmp_path / "data", log)
    try:
        wait_ready(serve, base, log)
        assert "API key" in log.read_text(), "the first start shows the local key"
        model, data = digits
        config = {"architecture": "idap:digits", **FAST}
        response = httpx.post(f"{base}/v1/jobs", data={"config": json.dumps(config)},
                              files={"model": (model.name, model.read_bytes()), "data": (data.name, data.read_bytes())})
        assert response.status_code == 202, response.text
        job_url = base + response.headers["location"]
        deadline = time.monotonic() + 120
        while (job := httpx.get(job_url).json())["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        assert job["status"] == "succeeded", job
        onnx = httpx.get(f"{job_url}/artifacts/model.onnx")
        assert onnx.status_code == 200 and len(onnx.content) == int(onnx.headers["content-length"]) > 0
        worker_pids = children(serve.pid)
        assert worker_pids
    finally:
        serve.send_signal(signal.SIGTERM)
        serve.wait(timeout=60)
    for pid in worker_pids:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]

"""Helpers for the service tests (kept out of conftest.py, which pytest imports under its own name)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from benchmarks.load import free_port
from domain.settings import Settings

# Tiny budgets: the tests check the service, not the quality of the pruning.
FAST = {"target": {"macs_reduction": 0.3}, "device": "cpu",
        "recovery": {"recovery_iterations": 1, "final_recovery_iterations": 1}}
ROOT = Path(__file__).resolve().parents[2]


class LiveServer:
    """The app on uvicorn on a free loopback port, in a thread of this process (the API's RSS is this
    process's): real HTTP connections and one event loop, as `idap serve` has."""

    def __init__(self, settings: Settings) -> None:
        import uvicorn

        from api.app import create_app

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port,
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_serve(data_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """`idap serve` on a free loopback port in its embedded mode (no IDAP_* from this environment);
    returns the process and its base URL at once (see wait_ready)."""
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("IDAP_")}
    argv = [sys.executable, "-m", "core", "serve", "--port", str(port), "--data-dir", str(data_dir)]
    process = subprocess.Popen(argv, cwd=ROOT, env=env | {"OMP_NUM_THREADS": "1"}, stdout=log.open("wb"),
                               stderr=subprocess.STDOUT)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(process: subprocess.Popen[bytes], base: str, log: Path, timeout: float = 90,
               path: str = "/readyz") -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}{path}").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.5)


def start_worker(settings: Settings, log: Path, queues: str | None = None, pool: str = "solo",
                 concurrency: int = 1) -> subprocess.Popen[bytes]:
    """A job worker (the cpu queue) unless `queues` says otherwise; the webhook worker takes
    queues=settings.webhook_queue, pool="threads"."""
    queues = queues or settings.cpu_queue
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker.app", "worker", f"--pool={pool}", f"--concurrency={concurrency}",
         "-Q", queues, f"--hostname={log.stem}-{os.getpid()}@%h",
         "--loglevel=INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=ROOT, stdout=log.open("ab"), stderr=subprocess.STDOUT,
        env=settings.child_environment() | {"OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 60
    while b"ready." not in log.read_bytes():
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("celery worker did not start:\n" + log.read_text()[-3000:])
        time.sleep(0.2)
    return process


def stop_worker(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def submit(client: Any, key: str, digits: tuple[Path, Path], config: dict[str, Any] | None = None,
           **extra: Any) -> Any:
    model, data = digits
    config = {"architecture": "idap:digits", **FAST, **(config or {})}
    return client.post("/v1/jobs", headers=auth(key), data={"config": json.dumps(config)},
                       files={"model": (model.name, model.read_bytes()), "data": (data.name, data.read_bytes())},
                       **extra)


def wait_for(client: Any, key: str, job_id: str, done: Callable[[dict[str, Any]], bool],
             timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job = client.get(f"/v1/jobs/{job_id}", headers=auth(key)).json()
        if done(job):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job did not get there in {timeout} s: {job}")
        time.sleep(0.2)


def finished(job: dict[str, Any]) -> bool:
    return job["status"] in ("succeeded", "failed", "cancelled")


class Receiver:
    """A webhook receiver on 127.0.0.1 that answers 500 to the first `fail_first` requests."""

    def __init__(self, fail_first: int = 0) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.fail_first = fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802  (http.server's naming)
                body = self.rfile.read(int(self.headers["content-length"]))
                receiver.requests.append((dict(self.headers), body))
                self.send_response(500 if len(receiver.requests) <= receiver.fail_first else 204)
                self.end_headers()

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

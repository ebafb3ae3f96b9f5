"""Load test of the service on loopback: a burst of submissions and preflights while a client polls,
then hostile uploads (a decompression bomb, a pickle bomb, a pickle that crashes its reader).

    .venv/bin/python -m benchmarks.load                   # embedded: `idap serve` (SQLite, local broker, a worker)
    .venv/bin/python -m benchmarks.load --mode postgres   # the same against PostgreSQL and Redis

It starts the service itself (`idap serve` in a temporary data directory, with pickles allowed so
that the pickles reach their loader, and a 2 GiB memory limit per sandbox), waits for it, and:

1. sends `--submissions` concurrent `POST /v1/jobs` and `--inspections` concurrent `POST /v1/inspect`
   (the digits example) while one client polls `GET /v1/jobs/{id}` back to back;
2. counts the jobs that exist against the 202 answers, and samples the API process's RSS;
3. uploads each hostile file to `/v1/inspect` and records the answer and the API's RSS around it.

It prints a table and writes JSON (`--out`), and exits 1 when a goal is missed: no 5xx, jobs ==
accepted submissions, poll p99 < 200 ms, API RSS growth < 300 MB, every hostile file refused with a
4xx while the API's RSS moves by less than 50 MB and it still answers. Everything is bounded: the
requests, the sandbox memory, and a deadline on every wait. The Postgres mode needs a server at
127.0.0.1:5432 (user postgres, trust auth; a throwaway database is created and dropped) and Redis
at 127.0.0.1:6379 (db 12, run-specific queue names).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import pickle
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
GOALS = {"poll_p99_ms": 200.0, "rss_growth_mb": 300.0, "hostile_rss_mb": 50.0}
# Tiny budgets: the load is on the service, not on the pruning.
INSPECT = {"architecture": "idap:digits", "target": {"macs_reduction": 0.3}}
SUBMIT = INSPECT | {"device": "cpu", "recovery": {"recovery_iterations": 1, "final_recovery_iterations": 1}}

# What the hostile pickles run when unpickled (only a server with IDAP_ALLOW_PICKLE=true gets that far).
PICKLE_BOMB = "blocks = [b'x' * (1 << 26) for _ in range(1 << 16)]"  # 4 TiB, 64 MiB at a time, all touched
CRASHING_PICKLE = "import ctypes; ctypes.string_at(0)"  # reads address 0: SIGSEGV
BUSY_PICKLE = "while True: pass"


class _Run:
    """Pickles to a call of exec(code): unpickling it runs `code`."""

    def __init__(self, code: str) -> None:
        self.code = code

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return exec, (self.code,)


def write_pickle(path: Path, code: str) -> Path:
    path.write_bytes(pickle.dumps(_Run(code), protocol=2))
    return path


def write_npz_bomb(path: Path, inflated_bytes: int = 2 << 30, features: int = 512) -> Path:
    """An .npz whose one array, x (float32 zeros, `features` wide), inflates to `inflated_bytes`: the
    default is 9.4 MB on disk and declares 1,048,576 samples, as the file of issue 18 did."""
    shape = (inflated_bytes // (4 * features), features)
    zero = bytes(1 << 24)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open("x.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False, "shape": shape})
            for _ in range(inflated_bytes // len(zero)):
                member.write(zero)
    return path


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ms = np.asarray(values) * 1000
    return {"n": len(values), "p50_ms": float(np.percentile(ms, 50)), "p95_ms": float(np.percentile(ms, 95)),
            "p99_ms": float(np.percentile(ms, 99)), "max_ms": float(ms.max())}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    """`idap serve` in `data_dir`, on PostgreSQL and Redis when `database_url` is given."""

    def __init__(self, data_dir: Path, database_url: str | None, broker_url: str | None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        run = secrets.token_hex(4)
        env = {name: value for name, value in os.environ.items() if not name.startswith("IDAP_")}
        env |= {"IDAP_ALLOW_PICKLE": "true", "IDAP_INSPECT_MEMORY_BYTES": str(2 << 30), "OMP_NUM_THREADS": "1"}
        if database_url:
            env |= {"IDAP_DATABASE_URL": database_url, "IDAP_BROKER_URL": broker_url or "",
                    "IDAP_CPU_QUEUE": f"load-{run}-cpu", "IDAP_GPU_QUEUE": f"load-{run}-gpu",
                    "IDAP_WEBHOOK_QUEUE": f"load-{run}-webhooks"}
        self.log = data_dir / "serve.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "core", "serve", "--port", str(self.port), "--data-dir", str(data_dir / "data")],
            cwd=ROOT, env=env, stdout=self.log.open("wb"), stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the service did not start:\n" + self.log.read_text()[-3000:])
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def post_files(client: httpx.Client, path: str, model: Path, data: Path | None) -> tuple[int, float, dict[str, Any]]:
    files = {"model": (model.name, model.read_bytes())}
    if data is not None:
        files["data"] = (data.name, data.read_bytes())
    started = time.perf_counter()
    config = SUBMIT if path == "/v1/jobs" else INSPECT
    response = client.post(path, data={"config": json.dumps(config)}, files=files)
    elapsed = time.perf_counter() - started
    try:
        body = response.json()
    except ValueError:
        body = {"text": response.text[:500]}
    return response.status_code, elapsed, body


def list_job_ids(client: httpx.Client) -> set[str]:
    ids: set[str] = set()
    cursor = None
    while True:
        page = client.get("/v1/jobs", params={"limit": 200} | ({"cursor": cursor} if cursor else {})).json()
        ids |= {job["id"] for job in page["jobs"]}
        cursor = page["next_cursor"]
        if cursor is None:
            return ids


def poll(url: str, job_id: str, stop: Any, answers: Any) -> None:
    """GET the job back to back (10 ms apart) until `stop`; put (latencies, {status: count}) on `answers`."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=30) as client:
        client.get(f"/v1/jobs/{job_id}")
        answers.put("polling")
        while not stop.is_set():
            started = time.perf_counter()
            status = client.get(f"/v1/jobs/{job_id}").status_code
            latencies.append(time.perf_counter() - started)
            statuses[status] = statuses.get(status, 0) + 1
            time.sleep(0.01)
    answers.put((latencies, statuses))


def burst(service: Service, model: Path, data: Path, submissions: int, inspections: int) -> dict[str, Any]:
    pid = service.process.pid
    with httpx.Client(base_url=service.url, timeout=600) as client:
        # warm: the sandboxes start on first use, and the poller needs a job
        first = post_files(client, "/v1/jobs", model, data)
        assert first[0] == 202, first
        post_files(client, "/v1/inspect", model, data)
        job_id = first[2]["id"]
        jobs_before = list_job_ids(client)
    rss_before = rss_mb(pid)
    rss_samples = [rss_before]
    done = threading.Event()

    def sample_rss() -> None:
        while not done.wait(0.2):
            rss_samples.append(rss_mb(pid))

    def one(kind: str) -> tuple[str, int, float, dict[str, Any]]:
        with httpx.Client(base_url=service.url, timeout=600) as client:
            if kind == "submit":
                return (kind, *post_files(client, "/v1/jobs", model, data))
            return (kind, *post_files(client, "/v1/inspect", model, data))

    # The poller is a process of its own: in a thread here, its timings would include this process's
    # own contention (a hundred threads building multipart bodies).
    context = multiprocessing.get_context("spawn")
    stop, answers = context.Event(), context.Queue()
    poller = context.Process(target=poll, args=(service.url, job_id, stop, answers))
    sampler = threading.Thread(target=sample_rss)
    poller.start()
    sampler.start()
    if not answers.get(timeout=60) == "polling":
        raise RuntimeError("the poller did not start")
    started = time.perf_counter()
    kinds = ["submit"] * submissions + ["inspect"] * inspections
    with ThreadPoolExecutor(len(kinds)) as pool:
        results = list(pool.map(one, kinds))
    wall = time.perf_counter() - started
    time.sleep(0.5)
    stop.set()
    done.set()
    polls, poll_statuses = answers.get(timeout=60)
    poller.join(30)
    sampler.join()
    with httpx.Client(base_url=service.url, timeout=60) as client:
        new_jobs = list_job_ids(client) - jobs_before
    accepted = {body["id"] for kind, status, _, body in results if kind == "submit" and status == 202}
    statuses: dict[str, dict[int, int]] = {"submit": {}, "inspect": {}}
    for kind, status, _, _ in results:
        statuses[kind][status] = statuses[kind].get(status, 0) + 1
    return {
        "wall_s": wall,
        "statuses": statuses,
        "poll_statuses": poll_statuses,
        "errors_5xx": sum(1 for _, status, _, _ in results if status >= 500) + sum(
            count for status, count in poll_statuses.items() if status >= 500),
        "accepted": len(accepted),
        "jobs_created": len(new_jobs),
        "jobs_match": new_jobs == accepted,
        "poll": percentiles(polls),
        "submit": percentiles([elapsed for kind, _, elapsed, _ in results if kind == "submit"]),
        "inspect": percentiles([elapsed for kind, _, elapsed, _ in results if kind == "inspect"]),
        "rss_before_mb": rss_before,
        "rss_max_mb": max(rss_samples),
        "rss_growth_mb": max(rss_samples) - rss_before,
        "sample_errors": sorted({json.dumps(body)[:300] for _, status, _, body in results if status >= 400})[:5],
    }


def hostile(service: Service, model: Path, data: Path, scratch: Path) -> list[dict[str, Any]]:
    cases = [
        ("npz bomb (9.4 MB -> 2 GiB)", model, write_npz_bomb(scratch / "bomb.npz")),
        ("pickle bomb", write_pickle(scratch / "bomb.pt", PICKLE_BOMB), data),
        ("pickle that segfaults", write_pickle(scratch / "crash.pt", CRASHING_PICKLE), data),
    ]
    rows = []
    with httpx.Client(base_url=service.url, timeout=900) as client:
        for name, case_model, case_data in cases:
            before = rss_mb(service.process.pid)
            status, elapsed, body = post_files(client, "/v1/inspect", case_model, case_data)
            after = rss_mb(service.process.pid)
            alive = client.get("/healthz").status_code == 200
            rows.append({"case": name, "status": status, "code": body.get("error", {}).get("code"),
                         "seconds": elapsed, "rss_before_mb": before, "rss_after_mb": after,
                         "rss_delta_mb": after - before, "api_alive": alive})
    return rows


def failures(result: dict[str, Any]) -> list[str]:
    burst_, problems = result["burst"], []
    if burst_["errors_5xx"]:
        problems.append(f"{burst_['errors_5xx']} answers were 5xx")
    if not burst_["jobs_match"]:
        problems.append(f"{burst_['jobs_created']} jobs exist for {burst_['accepted']} accepted submissions")
    if burst_["poll"].get("p99_ms", 0) >= GOALS["poll_p99_ms"]:
        problems.append(f"poll p99 {burst_['poll']['p99_ms']:.0f} ms")
    if burst_["rss_growth_mb"] >= GOALS["rss_growth_mb"]:
        problems.append(f"API RSS grew {burst_['rss_growth_mb']:.0f} MB")
    for row in result["hostile"]:
        if not (400 <= row["status"] < 500 and row["api_alive"]
                and abs(row["rss_delta_mb"]) < GOALS["hostile_rss_mb"]):
            problems.append(f"{row['case']}: {row}")
    return problems


def show(result: dict[str, Any]) -> None:
    burst_ = result["burst"]
    print(f"\nmode: {result['mode']}  ({result['submissions']} submissions + {result['inspections']} preflights "
          f"in {burst_['wall_s']:.1f} s; answers {burst_['statuses']}, polls {burst_['poll_statuses']})")
    print(f"{'requests':<10} {'n':>5} {'p50 ms':>9} {'p95 ms':>9} {'p99 ms':>9} {'max ms':>9}")
    for name in ("poll", "submit", "inspect"):
        row = burst_[name]
        print(f"{name:<10} {row['n']:>5} {row['p50_ms']:>9.1f} {row['p95_ms']:>9.1f} {row['p99_ms']:>9.1f} "
              f"{row['max_ms']:>9.1f}")
    print(f"jobs created {burst_['jobs_created']} for {burst_['accepted']} accepted (match: {burst_['jobs_match']}); "
          f"5xx: {burst_['errors_5xx']}; API RSS {burst_['rss_before_mb']:.0f} MB -> max {burst_['rss_max_mb']:.0f} MB "
          f"(+{burst_['rss_growth_mb']:.0f} MB)")
    for row in result["hostile"]:
        print(f"{row['case']:<28} {row['status']} {row['code']:<26} {row['seconds']:6.1f} s  API RSS "
              f"{row['rss_before_mb']:.0f} -> {row['rss_after_mb']:.0f} MB  alive: {row['api_alive']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=["embedded", "postgres"], default="embedded")
    parser.add_argument("--submissions", type=int, default=50)
    parser.add_argument("--inspections", type=int, default=50)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres",
                        help="a database to create the throwaway one from (postgres mode)")
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/12", help="the broker (postgres mode)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)

    from core.examples import make_digits_example

    with tempfile.TemporaryDirectory(prefix="idap-load-") as tmp:
        scratch = Path(tmp)
        model_pt, data = make_digits_example(scratch / "example", seed=0, epochs=1)
        model = model_pt.with_suffix(".safetensors")
        database_url, drop = None, None
        if args.mode == "postgres":
            database_url, drop = _throwaway_database(args.postgres)
        service = Service(scratch, database_url, args.redis if database_url else None)
        try:
            service.wait_ready()
            result = {"mode": args.mode, "submissions": args.submissions, "inspections": args.inspections,
                      "burst": burst(service, model, data, args.submissions, args.inspections),
                      "hostile": hostile(service, model, data, scratch)}
        finally:
            service.stop()
            if drop is not None:
                drop()
    result["failures"] = failures(result)
    show(result)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2))
    for problem in result["failures"]:
        print("MISSED:", problem, file=sys.stderr)
    return 1 if result["failures"] else 0


def _throwaway_database(admin_url: str) -> tuple[str, Any]:
    import psycopg

    name = f"idap_load_{secrets.token_hex(4)}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)

    def drop() -> None:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    return f"{base}/{name}", drop


if __name__ == "__main__":
    sys.exit(main())

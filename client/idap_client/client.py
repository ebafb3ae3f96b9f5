"""`Client` (the service) and `Job` (one job on it): the Python API of idap-client."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from idap_client.errors import ChecksumMismatch, IdapError, JobFailed, WaitTimeout
from idap_client.models import JobInfo, JobPage, Preflight, Report
from idap_client.transport import RetryPolicy, Transport

# config keys a caller may pass flat to submit()/inspect(); they belong under "target"
TARGET_KEYS = ("macs_reduction", "params_reduction", "max_accuracy_drop")


def job_config(config: dict[str, Any]) -> dict[str, Any]:
    """The API's config from keyword arguments: flat target keys move under `target`, None values go."""
    config = {key: value for key, value in config.items() if value is not None}
    target = dict(config.pop("target", None) or {})
    for key in TARGET_KEYS:
        if key in config:
            target[key] = config.pop(key)
    return config | ({"target": target} if target else {})


def _upload(fields: dict[str, Path], config: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    def body() -> dict[str, Any]:
        return {"files": {name: (path.name, path.open("rb")) for name, path in fields.items()},
                "data": {"config": json.dumps(config)}}

    return body


class Client:
    """The service at `url` (default: $IDAP_SERVER), with `api_key` (default: $IDAP_API_KEY; none is
    needed on the server's loopback). Connection errors, 429 and 503 are retried (see RetryPolicy)."""

    def __init__(self, url: str | None = None, api_key: str | None = None, *, timeout: float = 300.0,
                 retry: RetryPolicy | None = None, http: httpx.Client | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        url = url or os.environ.get("IDAP_SERVER")
        if not url:
            raise IdapError("No server: pass url= or set IDAP_SERVER (e.g. http://127.0.0.1:8000).")
        self.url = url.rstrip("/")
        self.transport = Transport(self.url, api_key or os.environ.get("IDAP_API_KEY"), timeout=timeout,
                                   retry=retry or RetryPolicy(), http=http, sleep=sleep)

    def submit(self, model: str | os.PathLike[str], data: str | os.PathLike[str], *,
               idempotency_key: str | None = None, **config: Any) -> Job:
        """Uploads the model and data with `config` (the API's JobConfig: `architecture="idap:digits"`,
        `target={...}` or flat `macs_reduction=0.5`, ...). Every submit carries an idempotency key (a new
        one unless given), so a retry after a lost response returns the same job instead of a second one."""
        body = job_config(config)
        key = idempotency_key or body.get("idempotency_key") or uuid.uuid4().hex
        body["idempotency_key"] = key
        response = self.transport.request("POST", "/v1/jobs", headers={"Idempotency-Key": key},
                                          body=_upload({"model": Path(model), "data": Path(data)}, body))
        return Job(self, JobInfo.model_validate(response.json()))

    def inspect(self, model: str | os.PathLike[str], data: str | os.PathLike[str] | None = None,
                **config: Any) -> Preflight:
        """The preflight alone: sizes, what can be pruned, what is reachable, a time estimate."""
        files = {"model": Path(model)} | ({"data": Path(data)} if data is not None else {})
        response = self.transport.request("POST", "/v1/inspect", body=_upload(files, job_config(config)))
        return Preflight.model_validate(response.json())

    def job(self, job_id: str) -> Job:
        return Job(self, self._get(job_id))

    def jobs(self, status: str | None = None, limit: int | None = None) -> list[Job]:
        """This key's jobs, newest first (every page, or the first `limit`)."""
        found: list[Job] = []
        cursor: str | None = None
        while limit is None or len(found) < limit:
            params = {"status": status, "cursor": cursor, "limit": 200 if limit is None else min(200, limit)}
            response = self.transport.request(
                "GET", "/v1/jobs", params={key: value for key, value in params.items() if value is not None})
            page = JobPage.model_validate(response.json())
            found += [Job(self, info) for info in page.jobs]
            cursor = page.next_cursor
            if cursor is None:
                break
        return found if limit is None else found[:limit]

    def _get(self, job_id: str) -> JobInfo:
        return JobInfo.model_validate(self.transport.request("GET", f"/v1/jobs/{job_id}").json())


class Job:
    """A job on the service; `info` is its state as last fetched."""

    def __init__(self, client: Client, info: JobInfo) -> None:
        self.client = client
        self.info = info

    @property
    def id(self) -> str:
        return self.info.id

    @property
    def status(self) -> str:
        return self.info.status

    def __repr__(self) -> str:
        return f"Job({self.id!r}, status={self.status!r})"

    def refresh(self) -> JobInfo:
        self.info = self.client._get(self.id)
        return self.info

    def wait(self, timeout: float | None = None, on_progress: Callable[[JobInfo], None] | None = None, *,
             check: bool = True, poll_interval: float = 1.0) -> JobInfo:
        """Polls until the job finishes; `on_progress` sees every change of status or progress. Raises
        JobFailed when it ended failed or cancelled (unless `check=False`), WaitTimeout after `timeout` s."""
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = None
        while True:
            info = self.refresh()
            state = (info.status, info.progress, info.attempts)
            if on_progress is not None and state != seen:
                on_progress(info)
            seen = state
            if info.finished:
                if check and not info.succeeded:
                    raise JobFailed(info)
                return info
            if deadline is not None and time.monotonic() >= deadline:
                raise WaitTimeout(info, timeout or 0.0)
            pause = poll_interval if deadline is None else min(poll_interval, max(0.0, deadline - time.monotonic()))
            time.sleep(pause)

    def cancel(self) -> JobInfo:
        response = self.client.transport.request("POST", f"/v1/jobs/{self.id}/cancel")
        self.info = JobInfo.model_validate(response.json())
        return self.info

    def delete(self) -> None:
        self.client.transport.request("DELETE", f"/v1/jobs/{self.id}")

    def report(self) -> Report:
        """report.json, typed (the server answers 404 until the job has succeeded)."""
        return Report.model_validate(self.client.transport.request("GET", f"/v1/jobs/{self.id}/report").json())

    def download(self, directory: str | os.PathLike[str], names: list[str] | None = None) -> dict[str, Path]:
        """Saves the artifacts (all, or `names`) into `directory`, each checked against its listed size and
        SHA-256; returns {name: path}. A file appears under its name only once it is complete and checked."""
        info = self.info if self.info.artifacts else self.refresh()
        wanted = [artifact for artifact in info.artifacts if names is None or artifact.name in names]
        if not wanted:
            raise IdapError(f"job {self.id} ({info.status}) has no artifacts"
                            + (f" named {', '.join(names)}" if names else "") + ".")
        target = Path(directory)
        target.mkdir(parents=True, exist_ok=True)
        saved = {}
        for artifact in wanted:
            path = target / Path(artifact.name).name
            partial = path.with_name(path.name + ".part")

            size, sha256 = self.client.transport.download(f"/v1/jobs/{self.id}/artifacts/{artifact.name}", partial)
            if (size, sha256) != (artifact.size, artifact.sha256):
                partial.unlink()
                raise ChecksumMismatch(f"{artifact.name}: got {size} bytes with SHA-256 {sha256}, the job lists "
                                       f"{artifact.size} bytes with {artifact.sha256}.")
            partial.replace(path)
            saved[artifact.name] = path
        return saved

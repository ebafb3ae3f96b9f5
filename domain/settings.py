"""The service's configuration: one object, read from `IDAP_*` environment variables.

Every default runs the embedded mode: SQLite, a SQLAlchemy-backed Celery broker and local
artifact storage, all under `data_dir`, so `idap serve` needs no external server.
"""

from __future__ import annotations

import ipaddress
import json
import os
import tempfile
from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from core.options import IntakeOptions

_INTAKE = IntakeOptions()


def _default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "idap"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="IDAP_", extra="ignore")

    data_dir: Path = Field(default_factory=_default_data_dir)
    # Unset URLs fall back to files under data_dir (see the properties below).
    database_url: str | None = None
    broker_url: str | None = None
    storage_url: str | None = None
    s3_endpoint_url: str | None = None

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # None: keys are required exactly when the server listens beyond loopback.
    require_auth: bool | None = None
    # With keys required, /metrics (every tenant's job counts) answers only to `Authorization: Bearer
    # <metrics_token>`, and /readyz shows its checks only to it or to a valid API key. None: /metrics is closed.
    metrics_token: str | None = None
    public_url: str | None = None

    max_upload_bytes: int = _INTAKE.max_file_bytes
    max_zip_members: int = _INTAKE.max_zip_members
    max_unpacked_bytes: int = _INTAKE.max_unpacked_bytes
    max_samples: int = _INTAKE.max_samples
    allow_pickle: bool = False
    # Uploads are checked (read, preflight) in sandbox processes of the API (api/services/sandbox.py):
    # this many at a time, each within these limits; more requests than inspect_max_pending
    # uploading or waiting for a sandbox are answered 429.
    inspect_workers: int = Field(default=2, ge=1, le=64)
    inspect_max_pending: int = Field(default=128, ge=1)
    inspect_memory_bytes: int = Field(default=8 << 30, ge=256 << 20)
    inspect_cpu_s: int = Field(default=300, ge=1)
    inspect_timeout_s: float = Field(default=600.0, gt=0)
    # How often the API's relay sends jobs the broker has not taken yet (domain/outbox.py).
    dispatch_interval_s: float = Field(default=2.0, gt=0)

    cpu_queue: str = "cpu"
    gpu_queue: str = "gpu"
    webhook_queue: str = "webhooks"
    # "cpu" or "gpu": where jobs with device "auto" go.
    default_queue: str = "cpu"
    max_attempts: int = Field(default=3, ge=1)
    retry_backoff_s: float = Field(default=10.0, ge=0)
    soft_time_limit_s: int = Field(default=6 * 3600, ge=1)
    hard_time_limit_s: int = Field(default=6 * 3600 + 300, ge=1)
    # A running job whose worker stopped heartbeating for stale_after_s is taken over by another worker,
    # found by a reaper that every worker runs each reaper_interval_s: a dead worker's job waits at most
    # stale_after_s + reaper_interval_s, then resumes from its last checkpoint.
    heartbeat_interval_s: float = Field(default=2.0, gt=0)
    stale_after_s: float = Field(default=10.0, gt=0)
    reaper_interval_s: float = Field(default=2.0, gt=0)
    progress_interval_s: float = Field(default=0.5, ge=0)
    # Where a job's inputs are copied while it runs (job-<id>-* directories, removed on every exit
    # path; those of dead processes are swept when a worker starts and before each job). None: the
    # system's temporary directory.
    scratch_dir: Path | None = None
    # The host's index of the GPU this worker process is pinned to: set (with CUDA_VISIBLE_DEVICES) by
    # `idap worker --gpus N` for the worker it starts, which reports it in its Worker row.
    worker_gpu: int | None = Field(default=None, ge=0)
    # CUDA devices a job may ask for: those of the GPU workers seen in this many seconds (long, so that a
    # job submitted while its workers restart is not refused).
    device_report_ttl_s: float = Field(default=3600.0, ge=0)
    # A worker counts as live (GET /v1/queue, /metrics) when it reported within this many seconds: each
    # reports every reaper_interval_s while it runs.
    worker_live_s: float = Field(default=30.0, gt=0)
    broker_visibility_timeout_s: int = 12 * 3600

    webhook_allow_private: bool = False
    # webhook deliveries at a time on the webhook worker that `idap serve` starts beside the job worker
    webhook_concurrency: int = Field(default=4, ge=1)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    webhook_retry_schedule_s: list[float] = [10, 60, 300, 1800, 7200]

    @property
    def database(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'idap.db'}"

    @property
    def broker(self) -> str:
        return self.broker_url or f"sqla+sqlite:///{self.data_dir / 'broker.db'}"

    @property
    def storage(self) -> str:
        return self.storage_url or str(self.data_dir / "artifacts")

    @property
    def scratch(self) -> Path:
        return self.scratch_dir or Path(tempfile.gettempdir())

    @property
    def auth_required(self) -> bool:
        if self.require_auth is not None:
            return self.require_auth
        return not _is_loopback(self.host)

    def environment(self) -> dict[str, str]:
        """The `IDAP_*` variables that give another process these settings (a worker started by
        `idap serve`, by a test or by an operator's script): every field, as pydantic-settings reads it."""
        variables = {}
        for name, value in self.model_dump(mode="json").items():
            if value is not None:
                text = json.dumps(value) if isinstance(value, list | bool) else str(value)
                variables[f"IDAP_{name.upper()}"] = text
        return variables

    def child_environment(self) -> dict[str, str]:
        """This process's environment for a child process, with these settings in place of any `IDAP_*`
        variable it has (an unset field must not come back from the parent's environment)."""
        inherited = {name: value for name, value in os.environ.items() if not name.startswith("IDAP_")}
        return inherited | self.environment()

    def queue_for(self, device: str) -> str:
        if device == "cpu":
            return self.cpu_queue
        if device.startswith("cuda"):
            return self.gpu_queue
        return self.gpu_queue if self.default_queue == "gpu" else self.cpu_queue


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache
def get_settings() -> Settings:
    return Settings()

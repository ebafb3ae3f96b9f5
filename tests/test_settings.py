"""Settings reach another process whole: what a worker started by `idap serve` (or by a test) reads
from Settings.child_environment is the object the parent holds, and nothing else of the parent's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from domain.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def test_a_child_process_reads_the_same_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the parent's environment names a public URL and a queue; the object passed on says otherwise
    monkeypatch.setenv("IDAP_PUBLIC_URL", "https://parent.example")
    monkeypatch.setenv("IDAP_CPU_QUEUE", "parent-queue")
    settings = Settings(data_dir=tmp_path, public_url=None, cpu_queue="child-queue", require_auth=True,
                        webhook_allow_private=True, webhook_retry_schedule_s=[0.5, 2.0], retry_backoff_s=0.25)
    script = "from domain.settings import Settings; print(Settings().model_dump_json())"
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=settings.child_environment(),
                         capture_output=True, text=True, check=True).stdout
    assert Settings.model_validate_json(out) == settings

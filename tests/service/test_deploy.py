"""docker-compose.yml and the Dockerfile: parsed here; `docker-compose config` where that client exists."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.service.helpers import ROOT


def test_compose_file_has_the_stack() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "redis", "migrate", "api", "worker", "webhooks"} <= set(services)
    # webhooks have a worker of their own: their retries never wait behind a job
    assert "webhooks" not in services["worker"]["command"][-1].split(",")
    assert services["webhooks"]["command"][:4] == ["idap", "worker", "--queues", "webhooks"]
    assert services["migrate"]["command"] == ["idap", "db", "upgrade"]
    assert services["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    gpu = services["worker"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    for name in ("api", "worker", "webhooks"):
        assert "artifacts:/data" in services[name]["volumes"]
        assert services[name]["environment"]["IDAP_DATABASE_URL"].startswith("postgresql")


def test_dockerfile_runs_as_a_non_root_user() -> None:
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    assert lines[next(i for i, line in enumerate(lines) if line.startswith("FROM"))].endswith("-slim")
    users = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert users and users[-1] not in ("root", "0")


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="no docker-compose client here")
def test_docker_compose_config_accepts_it() -> None:
    subprocess.run(["docker-compose", "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"], check=True)

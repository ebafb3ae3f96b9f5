"""docker-compose.yml and the Dockerfile: the stack's shape, the image's layer order and targets,
`docker-compose config` (Debian's docker-compose; .ci/run installs it), and the worker's own
healthcheck run against a real worker. No Docker engine runs here: images are not built."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from domain.settings import Settings
from tests.service.helpers import ROOT

COMPOSE = ROOT / "docker-compose.yml"


def services() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())["services"]


def stages() -> dict[str, list[str]]:
    """The Dockerfile's instructions by stage name (continuation lines joined)."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    found: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("FROM "):
            current = found.setdefault(line.split()[-1], [])
        if line and not line.startswith("#"):
            current.append(line)
    return found


def test_compose_has_a_cpu_and_a_gpu_stack() -> None:
    stack = services()
    always = {name for name, service in stack.items() if "profiles" not in service}
    assert always == {"postgres", "redis", "migrate", "api", "webhooks"}
    assert stack["worker-cpu"]["profiles"] == ["cpu"] and stack["worker-gpu"]["profiles"] == ["gpu"]
    assert stack["worker-cpu"]["build"]["target"] == stack["api"]["build"]["target"] == "cpu"
    assert stack["worker-gpu"]["build"]["target"] == "gpu"
    gpu = stack["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "deploy" not in stack["worker-cpu"]
    assert stack["migrate"]["command"] == ["idap", "db", "upgrade"]
    assert stack["api"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    for name in ("api", "worker-cpu", "worker-gpu"):
        assert "artifacts:/data" in stack[name]["volumes"]
        assert stack[name]["environment"]["IDAP_DATABASE_URL"].startswith("postgresql")
    # jobs with device auto go where every worker listens; CUDA jobs only where a GPU is
    assert stack["api"]["environment"]["IDAP_DEFAULT_QUEUE"] == "cpu"
    assert "cpu" in stack["worker-cpu"]["command"][-1].split(",") and "gpu" not in stack["worker-cpu"]["command"][-1]
    assert {"cpu", "gpu"} <= set(stack["worker-gpu"]["command"][-1].split(","))
    # webhooks have a worker of their own: their retries never wait behind a job
    for name in ("worker-cpu", "worker-gpu"):
        assert "webhooks" not in stack[name]["command"][-1].split(",")
    assert stack["webhooks"]["command"][:4] == ["idap", "worker", "--queues", "webhooks"]
    assert "artifacts:/data" in stack["webhooks"]["volumes"]


def test_long_running_services_restart_and_workers_have_their_own_healthcheck() -> None:
    stack = services()
    for name in ("postgres", "redis", "api", "worker-cpu", "worker-gpu", "webhooks", *pinned_workers(stack)):
        assert stack[name]["restart"] == "unless-stopped", name
    assert stack["migrate"]["restart"] == "on-failure"
    for name in ("worker-cpu", "worker-gpu", "webhooks", *pinned_workers(stack)):
        assert "celery -A worker.app inspect ping" in stack[name]["healthcheck"]["test"][-1]


def pinned_workers(stack: dict[str, Any]) -> dict[str, int]:
    """The multi-gpu profile's workers (worker-gpuN) and the GPU each is named for."""
    return {name: int(name.removeprefix("worker-gpu")) for name in stack if re.fullmatch(r"worker-gpu\d+", name)}


def check_pinned_workers(stack: dict[str, Any]) -> None:
    """Each worker-gpuN reserves GPU N alone, is pinned to it, pings its own node gpuN@ and takes
    both job queues on the GPU image; no two share a GPU."""
    pinned = pinned_workers(stack)
    assert sorted(pinned.values()) == list(range(len(pinned))) and len(pinned) >= 2, pinned
    for name, gpu in pinned.items():
        service = stack[name]
        assert service["profiles"] == ["multi-gpu"] and service["build"]["target"] == "gpu", name
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and "count" not in device, name
        assert [str(d) for d in device["device_ids"]] == [str(gpu)], name
        command = service["command"]
        assert command[:2] == ["idap", "worker"] and command[command.index("--gpus") + 1] == str(gpu), name
        assert set(command[command.index("--queues") + 1].split(",")) == {"cpu", "gpu"}, name
        assert f"--destination gpu{gpu}@$$HOSTNAME" in service["healthcheck"]["test"][-1], name
        assert "artifacts:/data" in " ".join(service["volumes"]), name
        assert service["environment"]["IDAP_DATABASE_URL"].startswith("postgresql"), name


def test_a_multi_gpu_machine_runs_one_worker_pinned_to_each_gpu() -> None:
    check_pinned_workers(services())


def test_dockerfile_layers_dependencies_before_source_in_stages_with_cpu_and_gpu_targets() -> None:
    found = stages()
    assert {"cpu", "gpu"} <= set(found) and list(found)[-1] == "cpu"  # a plain build is the CPU image
    assert "download.pytorch.org/whl/cpu" in " ".join(found["torch-cpu"])
    assert "download.pytorch.org/whl/cu126" in " ".join(found["torch-gpu"])
    for stage in ("torch-cpu", "torch-gpu"):  # torch's layer sees only the pins
        copies = [line for line in found[stage] if line.startswith("COPY")]
        assert copies == ["COPY constraints.txt ./"], stage
    for stage in ("deps-cpu", "deps-gpu"):  # the other dependencies see only pyproject.toml, not README or code
        copies = [line for line in found[stage] if line.startswith("COPY")]
        assert copies == ["COPY pyproject.toml ./"], stage
    for target, deps in (("cpu", "deps-cpu"), ("gpu", "deps-gpu")):
        lines = found[target]
        assert lines.index(f"COPY --from={deps} /opt/venv /opt/venv") < lines.index("COPY --from=source /app /app")
        assert lines[-1] == "USER idap" and "RUN pip install --no-deps -e ." in lines
    assert found["base"][0].startswith("FROM python:") and found["base"][0].split()[1].endswith("-slim")


@pytest.mark.skipif(shutil.which("docker-compose") is None, reason="no docker-compose client here")
@pytest.mark.parametrize("profile", ["cpu", "gpu", "multi-gpu"])
def test_docker_compose_config_accepts_each_stack(profile: str) -> None:
    done = subprocess.run(["docker-compose", "-f", str(COMPOSE), "--profile", profile, "config"],
                          check=True, capture_output=True, text=True)
    rendered = yaml.safe_load(done.stdout)["services"]
    if profile == "multi-gpu":  # as compose itself reads the shared anchors and merge keys
        check_pinned_workers(rendered)
    else:
        assert rendered[f"worker-{profile}"]["profiles"] == [profile]


def test_the_worker_healthcheck_pings_a_real_worker(settings: Settings, worker: Path) -> None:
    # the image's worker is node celery@<hostname>; the test worker is named after its log and this process
    node = f"worker-{os.getpid()}@{socket.gethostname()}"
    command = services()["worker-cpu"]["healthcheck"]["test"][-1].replace("celery@$$HOSTNAME", node)
    assert node in command
    # `celery` from this venv, as the image has its venv's bin/ on PATH
    env = settings.child_environment() | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    alive = subprocess.run(["sh", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert alive.returncode == 0, alive.stdout + alive.stderr
    nobody = command.replace(node, "celery@nosuchhost").replace("--timeout 10", "--timeout 1")
    dead = subprocess.run(["sh", "-c", nobody], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert dead.returncode != 0 and "No nodes replied" in dead.stdout + dead.stderr

"""idap-client's MLflow integration against a real MLflow tracking server (SQLite backend, artifacts
proxied by the server) and a real `idap serve`: the job's numbers become the run's metrics, its files
the run's artifacts, for a run named on the command line and for the active run (MLFLOW_RUN_ID).

MLflow (the server) is large, about 0.85 GiB with its dependencies, so it is not in the project's
environment: this slow test installs it once into a venv under the user's cache and reuses it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.service.helpers import FAST, ROOT, free_port, start_serve, wait_ready

pytestmark = pytest.mark.slow
MLFLOW_VENV = Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "idap-tests" / "mlflow-venv"


def mlflow_python() -> Path:
    """The cached venv's python, with mlflow and this checkout's idap-client installed."""
    python = MLFLOW_VENV / "bin" / "python"
    if not python.exists() or subprocess.run([str(python), "-c", "import mlflow"]).returncode != 0:
        subprocess.run(["python3", "-m", "venv", "--clear", str(MLFLOW_VENV)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "mlflow"], check=True)
    # a local directory is built and installed anew each time: the checkout's client, not a cached one
    subprocess.run([str(python), "-m", "pip", "install", "-q", f"{ROOT / 'client'}[mlflow]"], check=True,
                   capture_output=True)
    return python


def clean_env(**extra: str) -> dict[str, str]:
    return {name: value for name, value in os.environ.items()
            if name not in ("PYTHONPATH", "VIRTUAL_ENV") and not name.startswith(("IDAP_", "MLFLOW_"))} | extra


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, str, str]]:
    """(the mlflow venv's python, the idap server's URL, the MLflow server's URL)."""
    where = tmp_path_factory.mktemp("mlflow")
    idap_log, mlflow_log = where / "serve.log", where / "mlflow.log"
    serve, idap_url = start_serve(where / "idap", idap_log)
    python = mlflow_python()
    port = free_port()
    tracking = subprocess.Popen(
        [str(python), "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{where / 'mlflow.db'}",
         "--artifacts-destination", str(where / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"], env=clean_env(), stdout=mlflow_log.open("wb"), stderr=subprocess.STDOUT)
    mlflow_url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(serve, idap_url, idap_log)
        wait_ready(tracking, mlflow_url, mlflow_log, timeout=180, path="/health")
        yield python, idap_url, mlflow_url
    finally:
        for process in (serve, tracking):
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=60)


def new_run(mlflow_url: str) -> str:
    response = httpx.post(f"{mlflow_url}/api/2.0/mlflow/runs/create", json={"experiment_id": "0"})
    response.raise_for_status()
    return response.json()["run"]["info"]["run_id"]


def logged(mlflow_url: str, run_id: str) -> tuple[dict[str, float], dict[str, str], dict[str, int]]:
    """The run's metrics, params and the sizes of its artifacts under idap/."""
    data = httpx.get(f"{mlflow_url}/api/2.0/mlflow/runs/get", params={"run_id": run_id}).json()["run"]["data"]
    files = httpx.get(f"{mlflow_url}/api/2.0/mlflow/artifacts/list", params={"run_id": run_id, "path": "idap"}).json()
    return ({metric["key"]: metric["value"] for metric in data.get("metrics", [])},
            {param["key"]: param["value"] for param in data.get("params", [])},
            {Path(entry["path"]).name: int(entry["file_size"]) for entry in files.get("files", [])})


def test_the_job_is_logged_to_the_named_run_and_to_the_active_run(
        servers: tuple[Path, str, str], digits: tuple[Path, Path], tmp_path: Path) -> None:
    python, idap_url, mlflow_url = servers
    config = tmp_path / "fast.json"
    config.write_text(json.dumps(FAST))
    named = new_run(mlflow_url)
    cli = [str(python), "-m", "idap_client.cli"]
    done = subprocess.run(cli + ["submit", str(digits[0]), "--data", str(digits[1]), "--architecture", "idap:digits",
                                 "--macs-reduction", "0.3", "--config", str(config), "--server", idap_url,
                                 "--download", str(tmp_path / "out"), "--mlflow-run-id", named],
                          env=clean_env(MLFLOW_TRACKING_URI=mlflow_url), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.splitlines()[0]
    assert f"logged to MLflow run {named}" in done.stdout
    job = httpx.get(f"{idap_url}/v1/jobs/{job_id}").json()

    metrics, params, files = logged(mlflow_url, named)
    assert metrics["idap.macs_after"] == job["metrics"]["macs_after"]
    assert metrics["idap.accuracy_after"] == pytest.approx(job["metrics"]["accuracy_after"])
    assert metrics["idap.latency_ms_after_batch_1"] == pytest.approx(job["metrics"]["latency_ms_after"]["batch_1"])
    assert params["idap.job_id"] == job_id and params["idap.target.macs_reduction"] == "0.3"
    assert (params["idap.task"], params["idap.metric"]) == ("classification", "top1")
    assert files == {artifact["name"]: artifact["size"] for artifact in job["artifacts"]}
    assert files == {path.name: path.stat().st_size for path in (tmp_path / "out").iterdir()}

    active = new_run(mlflow_url)
    again = subprocess.run(cli + ["status", job_id, "--server", idap_url, "--mlflow"],
                           env=clean_env(MLFLOW_TRACKING_URI=mlflow_url, MLFLOW_RUN_ID=active),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    metrics, params, files = logged(mlflow_url, active)
    assert metrics["idap.macs_after"] == job["metrics"]["macs_after"] and params["idap.job_id"] == job_id
    assert files == {}  # nothing was downloaded this time, so only the numbers went to the run

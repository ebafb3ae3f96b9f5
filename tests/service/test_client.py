"""idap-client against the real API (in process, Postgres, a real Celery worker): its models parse the
API's responses, the Python API and the CLI run a job to its artifacts, a failed job exits 1, and
retries (a lost submit response, 429/503 with Retry-After) neither lose nor duplicate a job."""

from __future__ import annotations

import json
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime as ort
import pytest
import torch
from fastapi.testclient import TestClient
from idap_client import Client, JobFailed, RetryPolicy, ServerUnavailable, models, summary
from idap_client.cli import main
from idap_client.transport import retry_after
from pydantic import BaseModel

import core.report as server_report
import domain.read_model as server_job
from domain.db import session_scope
from domain.models import Job
from domain.queue import CeleryQueue
from domain.settings import Settings
from tests.service.helpers import FAST

BASE = "http://testserver"  # the TestClient's host: the client's requests go to the in-process app
MIRRORS: list[tuple[type[BaseModel], type[BaseModel]]] = [
    (models.JobInfo, server_job.JobOut), (models.Progress, server_job.ProgressOut),
    (models.ErrorInfo, server_job.ErrorOut), (models.Artifact, server_job.ArtifactOut),
    (models.Metrics, server_report.ReportHeadline), (models.StepRecord, server_report.StepRecord),
    (models.LayerRow, server_report.LayerRow), (models.HeadRow, server_report.HeadRow),
    (models.RemovedBlock, server_report.RemovedBlock), (models.Preflight, server_report.PreflightReport),
    (models.GroupRow, server_report.GroupRow), (models.NotPrunableRow, server_report.NotPrunableRow),
    (models.OutputRow, server_report.OutputRow), (models.BlockRow, server_report.BlockRow),
    (models.Estimate, server_report.Estimate), (models.InputSignature, server_report.InputSignature),
    (models.PhaseCost, server_report.PhaseCost),
]


def fields(model: type[BaseModel]) -> set[str]:
    return set(model.model_fields) | set(model.model_computed_fields)


@pytest.mark.parametrize(("mirror", "server"), MIRRORS + [(models.Report, server_report.Report)],
                         ids=lambda model: model.__name__)
def test_the_client_models_mirror_the_api_schemas(mirror: type[BaseModel], server: type[BaseModel]) -> None:
    assert fields(mirror) == fields(server)


def test_the_client_knows_the_server_s_tasks_and_which_metrics_are_relative() -> None:
    from core.tasks.kinds import DetectionDecoder, Metric, Task

    assert [task.value for task in models.Task] == [task.value for task in Task]
    assert [d.value for d in models.DetectionDecoder] == [d.value for d in DetectionDecoder]
    assert models.RELATIVE_METRICS == {metric.value for metric in Metric if metric.relative or not metric.is_fraction}


@pytest.mark.parametrize(("metric", "before", "after", "row"), [
    ("top1", 0.99, 0.98, "top1  99.00%  98.00%  -1.00 pt"),
    ("perplexity", 12.0, 13.1, "perplexity  12.000  13.100  +9.2%"),
    ("recall_at_10", 0.5, 0.525, "recall_at_10  50.00%  52.50%  +2.50 pt"),
])
def test_the_summary_shows_the_task_s_metric_in_its_units(metric: str, before: float, after: float, row: str) -> None:
    from tests.report_fixtures import sample_report

    headline = sample_report(accuracy_metric=metric, accuracy_before=before, accuracy_after=after,
                             budget="its budget in words").headline()
    table = summary.metrics_table(models.Metrics.model_validate(headline.model_dump(mode="json")))
    assert row.split() in [line.split() for line in table.splitlines()], table
    assert "task               classification; its budget in words" in table


def run_onnx(path: Path, digits: tuple[Path, Path]) -> np.ndarray:
    with np.load(digits[1]) as data:
        x = data["x"][:4].astype(np.float32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def digits_config() -> dict[str, Any]:
    return {"architecture": "idap:digits", **FAST}


def test_python_api_submits_waits_downloads_and_reads_the_report(
        client: TestClient, keys: dict[str, str], digits: tuple[Path, Path], worker: Path, tmp_path: Path) -> None:
    api = Client(BASE, keys["a"], http=client)
    seen: list[models.JobInfo] = []
    job = api.submit(digits[0], digits[1], **digits_config())
    info = job.wait(timeout=120, on_progress=seen.append)
    assert info.succeeded and info.metrics is not None and seen[-1] == info
    assert {state.status for state in seen} <= {"queued", "running", "succeeded"}
    files = job.download(tmp_path)
    assert set(files) == {artifact.name for artifact in info.artifacts} >= {"model.onnx", "report.json"}
    assert run_onnx(files["model.onnx"], digits).shape == (4, 10)
    report = job.report()
    assert report.removed_blocks == info.metrics.removed_blocks == json.loads(files["report.json"].read_text())[
        "removed_blocks"]
    assert report.macs_after == info.metrics.macs_after < report.macs_before
    assert job.id in {listed.id for listed in api.jobs(status="succeeded")}
    preflight = api.inspect(digits[0], digits[1], architecture="idap:digits", macs_reduction=0.3)
    assert preflight.feasible and preflight.macs == report.macs_before


def test_cli_submit_wait_download(client: TestClient, keys: dict[str, str], digits: tuple[Path, Path], worker: Path,
                                  tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(FAST))
    code = main(["submit", str(digits[0]), "--data", str(digits[1]), "--architecture", "idap:digits",
                 "--macs-reduction", "0.3", "--config", str(config), "--server", BASE, "--key", keys["a"],
                 "--wait", "--download", str(tmp_path / "out")], http=client)
    out, err = capsys.readouterr()
    assert code == 0, err
    job_id = out.splitlines()[0]
    assert "succeeded" in err and "MACs" in out and "target met" in out
    latency = next(line for line in out.splitlines() if line.startswith("ORT latency batch 1"))
    assert latency.endswith("%") and latency.count(" ms") == 2
    assert run_onnx(tmp_path / "out" / "model.onnx", digits).shape == (4, 10)
    assert main(["status", job_id, "--server", BASE, "--key", keys["a"]], http=client) == 0
    assert "succeeded" in capsys.readouterr().out
    assert main(["download", job_id, "--out", str(tmp_path / "again"), "--server", BASE, "--key", keys["a"]],
                http=client) == 0
    assert (tmp_path / "again" / "model.onnx").read_bytes() == (tmp_path / "out" / "model.onnx").read_bytes()


def test_cli_submit_names_the_job_else_the_server_uses_the_model_file_name(
        client: TestClient, keys: dict[str, str], digits: tuple[Path, Path],
        capsys: pytest.CaptureFixture[str]) -> None:
    base = ["submit", str(digits[0]), "--data", str(digits[1]), "--architecture", "idap:digits",
            "--macs-reduction", "0.3", "--server", BASE, "--key", keys["a"]]
    assert main(base + ["--name", "digits, 30 % fewer MACs"], http=client) == 0
    named = capsys.readouterr().out.strip()
    assert main(base, http=client) == 0
    unnamed = capsys.readouterr().out.strip()
    api = Client(BASE, keys["a"], http=client)
    assert api.job(named).info.name == "digits, 30 % fewer MACs"
    assert api.job(unnamed).info.name == digits[0].name
    for job_id in (named, unnamed):
        api.job(job_id).cancel()


def test_cli_usage_and_refused_requests_exit_2(client: TestClient, keys: dict[str, str], digits: tuple[Path, Path],
                                               capsys: pytest.CaptureFixture[str]) -> None:
    base = ["submit", str(digits[0]), "--data", str(digits[1]), "--server", BASE, "--key", keys["a"]]
    assert main(base + ["--architecture", "idap:digits"], http=client) == 2
    assert "size target is required" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main(["submit", "--server", BASE])
    assert usage.value.code == 2
    # no architecture for safetensors weights: the server's preflight refuses it (422)
    assert main(base + ["--macs-reduction", "0.3"], http=client) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "HTTP 422" in err
    assert main(["status", "nosuchjob", "--server", BASE, "--key", keys["a"]], http=client) == 2
    assert "not found" in capsys.readouterr().err
    # --task reaches the server: the digits' class ids are not a generic model's float targets
    assert main(base + ["--architecture", "idap:digits", "--macs-reduction", "0.3", "--task", "generic",
                        "--max-quality-drop", "0.1"], http=client) == 2
    err = capsys.readouterr().err
    assert "Generic labels are target values" in err and "(labels_wrong_format, HTTP 422)" in err and "hint:" in err
    with pytest.raises(SystemExit):
        main(base + ["--macs-reduction", "0.3", "--task", "regression"])
    assert "invalid choice: 'regression'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a worker without CUDA")
def test_cli_a_failed_job_exits_1_with_its_error(client: TestClient, keys: dict[str, str], digits: tuple[Path, Path],
                                                 settings: Settings, worker: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A job asking for CUDA passes the API's CPU preflight; moved to the CPU-only worker, it fails there."""
    key = keys["a"]
    job = Client(BASE, key, http=client).submit(digits[0], digits[1], **digits_config() | {"device": "cuda"})
    with session_scope(settings.database) as session:
        session.get(Job, job.id).queue = settings.cpu_queue
    CeleryQueue(settings).enqueue_job(job.id, settings.cpu_queue)
    assert main(["status", job.id, "--wait", "--timeout", "120", "--server", BASE, "--key", key], http=client) == 1
    err = capsys.readouterr().err
    assert f"error: job {job.id} failed" in err and "CUDA" in err and "hint:" in err
    with pytest.raises(JobFailed) as failed:
        job.wait(timeout=10)
    assert failed.value.job.error is not None and failed.value.job.error.code == "invalid_options"


class LosesFirstSubmitResponse:
    """The HTTP client, except that the first submit's response is lost on the way back (the server
    made the job; the caller sees a broken connection)."""

    def __init__(self, inner: TestClient) -> None:
        self.inner = inner
        self.lost: list[httpx.Response] = []

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        response = self.inner.request(method, url, **kwargs)
        if method == "POST" and url.endswith("/v1/jobs") and not self.lost:
            self.lost.append(response)
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return response

    def stream(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.stream(*args, **kwargs)


def test_a_submit_retried_after_a_lost_response_makes_one_job(client: TestClient, keys: dict[str, str],
                                                              digits: tuple[Path, Path]) -> None:
    flaky = LosesFirstSubmitResponse(client)
    sleeps: list[float] = []
    api = Client(BASE, keys["b"], http=flaky, sleep=sleeps.append)  # type: ignore[arg-type]
    parked = digits_config() | {"device": "cuda"}  # the GPU queue has no worker here: the job stays queued
    job = api.submit(digits[0], digits[1], **parked)
    assert flaky.lost[0].status_code == 202 and flaky.lost[0].json()["id"] == job.id and len(sleeps) == 1
    key = job.info.config["idempotency_key"]
    assert [other.id for other in api.jobs() if other.info.config.get("idempotency_key") == key] == [job.id]
    assert job.cancel().status == "cancelled"


class Refuses:
    """Answers the first requests with these statuses and Retry-After values, then passes them on."""

    def __init__(self, inner: TestClient, answers: list[tuple[int, str]]) -> None:
        self.inner, self.answers = inner, list(answers)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        if self.answers:
            status, after = self.answers.pop(0)
            body = {"error": {"code": "busy", "message": "Try again later.", "hint": None}}
            return httpx.Response(status, headers={"Retry-After": after}, json=body,
                                  request=httpx.Request(method, url))
        return self.inner.request(method, url, **kwargs)


def test_429_and_503_are_retried_no_sooner_than_retry_after(client: TestClient, keys: dict[str, str]) -> None:
    sleeps: list[float] = []
    http = Refuses(client, [(503, "7"), (429, "3")])
    api = Client(BASE, keys["a"], http=http, sleep=sleeps.append)  # type: ignore[arg-type]
    # the third request gets through (the list may be empty: this test may run before any submit)
    assert isinstance(api.jobs(limit=1), list) and not http.answers
    assert sleeps[0] >= 7 and sleeps[1] >= 3
    gives_up = Client(BASE, keys["a"], http=Refuses(client, [(503, "1")] * 3),  # type: ignore[arg-type]
                      retry=RetryPolicy(attempts=3), sleep=sleeps.append)
    with pytest.raises(ServerUnavailable, match="Try again later"):
        gives_up.jobs()


def test_retry_after_reads_seconds_and_http_dates() -> None:
    def response(value: str) -> httpx.Response:
        return httpx.Response(503, headers={"Retry-After": value})

    assert retry_after(response("12")) == 12
    assert retry_after(response("Wed, 21 Oct 2015 07:28:00 GMT")) == 0  # in the past: no wait
    assert retry_after(response("soon")) is None and retry_after(httpx.Response(503)) is None


def test_an_unreachable_server_is_retried_then_the_cli_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    sleeps: list[float] = []
    with pytest.raises(ServerUnavailable, match="ConnectError"):
        Client("http://127.0.0.1:9", retry=RetryPolicy(attempts=4, backoff=0.5), sleep=sleeps.append).jobs()
    assert len(sleeps) == 3 and 0.25 <= sleeps[0] <= 0.5 and sleeps[0] < sleeps[2] <= 2
    assert main(["status", "abc", "--server", "http://127.0.0.1:9", "--retries", "1"]) == 1
    assert "gave up after 1 attempts" in capsys.readouterr().err


@pytest.mark.skipif(find_spec("mlflow") is not None, reason="MLflow is installed here")
def test_cli_asks_for_the_mlflow_extra_before_submitting(client: TestClient, keys: dict[str, str],
                                                          digits: tuple[Path, Path],
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    before = len(Client(BASE, keys["b"], http=client).jobs())
    code = main(["submit", str(digits[0]), "--data", str(digits[1]), "--architecture", "idap:digits",
                 "--macs-reduction", "0.3", "--server", BASE, "--key", keys["b"], "--mlflow"], http=client)
    assert code == 2 and "idap-client[mlflow]" in capsys.readouterr().err
    assert len(Client(BASE, keys["b"], http=client).jobs()) == before

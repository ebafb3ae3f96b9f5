"""MLflow: a job's numbers as metrics and its artifacts as files of an MLflow run (`idap-client[mlflow]`).

The run is the one named, else the active one (`mlflow.start_run()` in this process, or MLFLOW_RUN_ID as
`mlflow run` sets it for its steps); the tracking server comes from MLflow's own settings
(MLFLOW_TRACKING_URI)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from idap_client.errors import IdapError
from idap_client.models import JobInfo

ARTIFACT_PATH = "idap"


def _mlflow() -> Any:
    try:
        import mlflow
    except ImportError as exc:
        raise IdapError("MLflow is not installed: pip install 'idap-client[mlflow]'.") from exc
    return mlflow


def metric_values(job: JobInfo) -> dict[str, float]:
    """The job's metrics as MLflow metrics (numbers only, keys under `idap.`)."""
    if job.metrics is None:
        raise IdapError(f"job {job.id} ({job.status}) has no metrics to log.")
    metrics = job.metrics
    values: dict[str, float] = {
        name: float(getattr(metrics, name)) for name in (
            "macs_before", "macs_after", "params_before", "params_after", "macs_reduction", "params_reduction",
            "accuracy_before", "accuracy_after", "onnx_max_abs_diff", "seconds")}
    values["target_met"] = float(metrics.target_met)
    values["removed_blocks"] = float(len(metrics.removed_blocks))
    for when, latency in (("before", metrics.latency_ms_before), ("after", metrics.latency_ms_after)):
        for key, value in latency.items():
            values[f"latency_ms_{when}_{key}"] = float(value)
    return {f"idap.{name}": value for name, value in values.items()}


def log_job(job: JobInfo, files: dict[str, Path] | None = None, run_id: str | None = None) -> str:
    """Logs the job's metrics, its id and config (as params) and `files` (e.g. Job.download's result) to
    the MLflow run; returns the run's id."""
    mlflow = _mlflow()
    from mlflow.entities import Metric, Param

    if run_id is None:
        active = mlflow.active_run()
        run_id = active.info.run_id if active is not None else os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        raise IdapError("No MLflow run: pass --mlflow-run-id (run_id=), start a run, or set MLFLOW_RUN_ID.")
    now = int(time.time() * 1000)
    target = job.config.get("target") or {}
    values = metric_values(job)
    # accuracy_before/after are in the task's metric: say which, or a perplexity reads as a percentage
    metric = {"idap.task": job.metrics.task, "idap.metric": job.metrics.accuracy_metric} if job.metrics else {}
    params = {"idap.job_id": job.id, "idap.architecture": job.config.get("architecture"), **metric,
              **{f"idap.target.{key}": value for key, value in target.items()}}
    tracker = mlflow.tracking.MlflowClient()
    tracker.log_batch(run_id, metrics=[Metric(key, value, now, 0) for key, value in values.items()],
                      params=[Param(key, str(value)) for key, value in params.items() if value is not None])
    for path in (files or {}).values():
        tracker.log_artifact(run_id, str(path), artifact_path=ARTIFACT_PATH)
    return run_id

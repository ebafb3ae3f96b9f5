"""`idap-client`: submit a job and follow it from a shell or a CI step.

Exit codes: 0 the job succeeded (or the command did what it was asked); 1 the job failed or was
cancelled, or the server could not be reached or failed; 2 a usage error, or a request the server
refused as the caller's to fix (a bad file, config or key: HTTP 4xx).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import httpx

from idap_client.client import TARGET_KEYS, Client, Job
from idap_client.errors import ApiError, IdapError, JobFailed
from idap_client.models import DetectionDecoder, JobInfo, Task
from idap_client.summary import metrics_table, progress_line
from idap_client.transport import RetryPolicy

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="idap-client", description="Client of the IDAP++ Compress service.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--server", default=os.environ.get("IDAP_SERVER"), metavar="URL",
                        help="the service (default: $IDAP_SERVER)")
    common.add_argument("--key", default=os.environ.get("IDAP_API_KEY"), metavar="KEY",
                        help="API key (default: $IDAP_API_KEY; none needed on the server's loopback)")
    common.add_argument("--retries", type=int, default=RetryPolicy().attempts, metavar="N",
                        help="attempts per request on connection errors, 429 and 503 (default: %(default)s)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    submit = commands.add_parser("submit", parents=[common], help="upload a model and data, start a job")
    submit.add_argument("model", type=Path, metavar="MODEL")
    submit.add_argument("--data", type=Path, required=True, metavar="DATA")
    submit.add_argument("--architecture", metavar="SPEC", help='for .safetensors weights, e.g. "idap:digits"')
    submit.add_argument("--name", metavar="LABEL", help="the job's name in lists (default: the model file's name)")
    submit.add_argument("--macs-reduction", type=float, metavar="F", help="fraction of MACs to remove")
    submit.add_argument("--params-reduction", type=float, metavar="F", help="fraction of parameters to remove")
    submit.add_argument("--task", choices=[task.value for task in Task],
                        help="what the model does, which sets the quality metric (default: auto, inferred from the "
                             "model's outputs)")
    submit.add_argument("--detection-decoder", choices=[decoder.value for decoder in DetectionDecoder],
                        help="detection: decode an exported raw YOLO head (yolov5, yolov8); default auto")
    submit.add_argument("--max-accuracy-drop", "--max-quality-drop", type=float, metavar="F", dest="max_accuracy_drop",
                        help="budget on the task's quality metric: points as a fraction (0.01 = 1 pt of top-1, mAP, "
                             "mIoU, ...), or for causal-lm the relative rise in perplexity (0.1 = 10 %%); default: "
                             "the task's")
    submit.add_argument("--config", type=Path, metavar="FILE.json",
                        help="the rest of the job config (the API's JobConfig); the flags above override it")
    submit.add_argument("--idempotency-key", metavar="KEY",
                        help="submitting again with the same key returns the first job (default: a new key)")
    _follow_arguments(submit)

    status = commands.add_parser("status", parents=[common], help="a job's status (exit 1 if failed or cancelled)")
    status.add_argument("job", metavar="JOB")
    status.add_argument("--json", action="store_true", help="print the job as the API returns it")
    _follow_arguments(status)

    cancel = commands.add_parser("cancel", parents=[common], help="cancel a job")
    cancel.add_argument("job", metavar="JOB")

    download = commands.add_parser("download", parents=[common], help="download a finished job's artifacts")
    download.add_argument("job", metavar="JOB")
    download.add_argument("--out", type=Path, default=Path("."), metavar="DIR", help="(default: .)")
    return parser


def _follow_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--wait", action="store_true", help="follow the job until it ends (progress on stderr)")
    parser.add_argument("--timeout", type=float, metavar="SECONDS", help="with --wait: give up after this long")
    parser.add_argument("--download", type=Path, metavar="DIR", help="download the artifacts (implies --wait)")
    parser.add_argument("--mlflow", action="store_true",
                        help="log metrics and artifacts to the active MLflow run (MLFLOW_RUN_ID)")
    parser.add_argument("--mlflow-run-id", metavar="RUN", help="log to this MLflow run (implies --mlflow)")


def _config(args: argparse.Namespace) -> dict[str, Any]:
    config: dict[str, Any] = {}
    if args.config is not None:
        try:
            config = json.loads(args.config.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--config {args.config}: {exc}") from exc
        if not isinstance(config, dict):
            raise UsageError(f"--config {args.config}: a JSON object is expected")
    target = dict(config.pop("target", None) or {})
    for key in TARGET_KEYS:
        if getattr(args, key) is not None:
            target[key] = getattr(args, key)
    if not {"macs_reduction", "params_reduction"} & set(target):
        raise UsageError("a size target is required: --macs-reduction F or --params-reduction F")
    for key in ("architecture", "name", "task", "detection_decoder"):
        if getattr(args, key) is not None:
            config[key] = getattr(args, key)
    return config | {"target": target}


def _progress_printer() -> Any:
    tty = sys.stderr.isatty()

    def show(job: JobInfo) -> None:
        line = progress_line(job)
        if tty:
            sys.stderr.write("\r\033[K" + line[:200] + ("\n" if job.finished else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    return show


def _follow(job: Job, args: argparse.Namespace) -> int:
    """--wait / --download / --mlflow: follow the job to its end and report on it."""
    if not (args.wait or args.download or args.mlflow or args.mlflow_run_id):
        return EXIT_OK
    try:
        info = job.wait(timeout=args.timeout, on_progress=_progress_printer())
    except JobFailed as failed:
        _print_failure(failed.job)
        return EXIT_FAILED
    if info.metrics is not None:
        print(metrics_table(info.metrics))
    files = job.download(args.download) if args.download is not None else {}
    for name, path in files.items():
        print(f"{name}  {path}")
    if args.mlflow or args.mlflow_run_id:
        from idap_client.tracking import log_job

        run_id = log_job(info, files, args.mlflow_run_id)
        print(f"logged to MLflow run {run_id}")
    return EXIT_OK


def _print_failure(info: JobInfo) -> None:
    if info.error is not None:
        print(f"error: job {info.id} {info.status}: {info.error.message} ({info.error.code})", file=sys.stderr)
        if info.error.hint:
            print(f"hint: {info.error.hint}", file=sys.stderr)
    else:
        print(f"error: job {info.id} {info.status}", file=sys.stderr)


def _run(args: argparse.Namespace, http: httpx.Client | None) -> int:
    if not args.server:
        raise UsageError("no server: --server URL or IDAP_SERVER")
    if args.retries < 1:
        raise UsageError("--retries must be at least 1")
    if (getattr(args, "mlflow", False) or getattr(args, "mlflow_run_id", None)) and find_spec("mlflow") is None:
        raise UsageError("--mlflow needs MLflow: pip install 'idap-client[mlflow]'")
    client = Client(args.server, args.key, http=http, retry=RetryPolicy(attempts=args.retries))
    if args.command == "submit":
        for name in ("model", "data"):
            if not getattr(args, name).is_file():
                raise UsageError(f"{name} {getattr(args, name)}: no such file")
        config = _config(args)
        job = client.submit(args.model, args.data, idempotency_key=args.idempotency_key, **config)
        print(job.id, flush=True)
        return _follow(job, args)
    job = client.job(args.job)
    if args.command == "cancel":
        print(f"{job.id}  {job.cancel().status}")
        return EXIT_OK
    if args.command == "download":
        for name, path in job.download(args.out).items():
            print(f"{name}  {path}")
        return EXIT_OK
    if args.json:
        print(job.info.model_dump_json(indent=2))
    else:
        print(f"{job.id}  {progress_line(job.info)}")
        if job.info.metrics is not None and not (args.wait or args.download):
            print(metrics_table(job.info.metrics))
    if args.wait or args.download or args.mlflow or args.mlflow_run_id:
        return _follow(job, args)
    if job.info.finished and not job.info.succeeded:
        _print_failure(job.info)
        return EXIT_FAILED
    return EXIT_OK


def main(argv: Sequence[str] | None = None, http: httpx.Client | None = None) -> int:
    """The CLI; `http` replaces the HTTP client (tests run it against an in-process server)."""
    args = _parser().parse_args(argv)
    try:
        return _run(args, http)
    except UsageError as exc:
        print(f"idap-client: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ApiError as exc:
        print(f"error: {exc.message} ({exc.code}, HTTP {exc.status})", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        return EXIT_USAGE if 400 <= exc.status < 500 else EXIT_FAILED
    except IdapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

"""`idap serve | db upgrade | keys create | worker`, added to core's CLI through the
"idap.commands" entry point (core never imports the service)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from domain.settings import Settings, get_settings


def register(commands: Any) -> None:
    serve = commands.add_parser("serve", help="run the whole service on this machine (API + worker)")
    serve.add_argument("--host", help="interface to listen on (default 127.0.0.1; anything else requires API keys)")
    serve.add_argument("--port", type=int, help="port (default 8000)")
    serve.add_argument("--data-dir", type=Path, metavar="DIR",
                       help="database, queue and artifacts (default ~/.local/share/idap)")
    serve.add_argument("--no-worker", action="store_true", help="run only the API (workers run elsewhere)")
    serve.set_defaults(func=_serve)

    db = commands.add_parser("db", help="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="COMMAND")
    db_commands.add_parser("upgrade", help="apply the migrations").set_defaults(func=_db_upgrade)

    keys = commands.add_parser("keys", help="API keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    create = keys_commands.add_parser("create", help="create an API key (printed once) for a tenant")
    create.add_argument("--tenant", required=True, metavar="NAME", help="created when it does not exist yet")
    create.set_defaults(func=_keys_create)

    worker = commands.add_parser("worker", help="run a Celery worker for jobs (or, with --queues webhooks, webhooks)")
    worker.add_argument("--queues", metavar="LIST",
                        help="comma-separated (default: the cpu queue; run another worker with --queues webhooks "
                             "--pool threads --concurrency 8 for webhooks)")
    worker.add_argument("--concurrency", type=int, default=1, help="jobs at a time (default: %(default)s)")
    worker.add_argument("--pool", default="prefork", choices=["prefork", "solo", "threads"],
                        help="(default: %(default)s; time limits need prefork)")
    worker.add_argument("--gpus", type=_gpu_list, metavar="LIST",
                        help="comma-separated GPU indices as nvidia-smi numbers them (e.g. 0,1): one worker per GPU, "
                             "pinned to it (node gpuN@host; CUDA sees only that GPU, as cuda:0), taking the gpu and "
                             "cpu queues unless --queues says otherwise; with several, this process supervises them "
                             "and stops them all on SIGTERM")
    worker.set_defaults(func=_worker)


def _db_upgrade(_args: argparse.Namespace) -> int:
    from domain.db import upgrade

    upgrade(get_settings().database)
    print("database is up to date")
    return 0


def _keys_create(args: argparse.Namespace) -> int:
    from api.services.tenants import create_key, get_or_create_tenant
    from domain.db import session_scope

    with session_scope(get_settings().database) as session:
        tenant, created = get_or_create_tenant(session, args.tenant)
        key = create_key(session, tenant)
    print(f"API key for tenant {args.tenant} (shown only now): {key}")
    if created:
        print(f"Webhook signing secret of tenant {args.tenant} (shown only now): {tenant.webhook_secret}")
    return 0


def worker_argv(settings: Settings, queues: str | None, concurrency: int, pool: str,
                name: str | None = None) -> list[str]:
    queues = queues or settings.cpu_queue
    named = [f"--hostname={name}@%h"] if name else []
    return [sys.executable, "-m", "celery", "-A", "worker.app", "worker", "-Q", queues, f"--concurrency={concurrency}",
            f"--pool={pool}", "--loglevel=INFO", "--without-gossip", "--without-mingle", *named]


def _gpu_list(text: str) -> list[int]:
    try:
        gpus = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of GPU indices") from None
    if any(gpu < 0 for gpu in gpus) or len(set(gpus)) != len(gpus):
        raise argparse.ArgumentTypeError(f"{text!r}: GPU indices are distinct and not negative")
    return gpus


def pinned_environment(gpu: int, environ: Mapping[str, str]) -> dict[str, str]:
    """`environ` for a worker pinned to the host's GPU `gpu`: CUDA sees that GPU alone, as cuda:0.

    In a container given some GPUs (compose `device_ids`, `docker run --gpus`), the NVIDIA runtime
    lists them in NVIDIA_VISIBLE_DEVICES and CUDA numbers just those from 0, so the host's index
    becomes the GPU's place among them. Where it gives every GPU (all, or no runtime at all) CUDA's
    numbers are the host's; where it names GPUs by UUID (as Kubernetes' device plugin does), the
    host's numbers are unknown and `gpu` is taken as the container's own."""
    given = [part.strip() for part in environ.get("NVIDIA_VISIBLE_DEVICES", "all").split(",")]
    if not all(part.isdigit() for part in given):
        index = gpu
    else:
        present = sorted(int(part) for part in given)
        if gpu not in present:
            raise SystemExit(f"GPU {gpu} is not among this container's GPUs (NVIDIA_VISIBLE_DEVICES="
                             f"{environ['NVIDIA_VISIBLE_DEVICES']}): "
                             f"reserve it for the container (device_ids: [\"{gpu}\"]).")
        index = present.index(gpu)
    # nvidia-smi numbers GPUs by PCI bus; CUDA's default order (fastest first) may not
    return {**environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": str(index),
            "IDAP_WORKER_GPU": str(gpu)}


def _worker(args: argparse.Namespace) -> int:
    settings = get_settings()
    if not args.gpus:
        os.execv(sys.executable, worker_argv(settings, args.queues, args.concurrency, args.pool))
    queues = args.queues or f"{settings.gpu_queue},{settings.cpu_queue}"
    pinned = {gpu: (worker_argv(settings, queues, args.concurrency, args.pool, f"gpu{gpu}"),
                    pinned_environment(gpu, os.environ)) for gpu in args.gpus}
    if len(pinned) == 1:
        os.execve(sys.executable, *pinned[args.gpus[0]])
    return supervise(pinned)


def supervise(pinned: dict[int, tuple[list[str], dict[str, str]]]) -> int:
    """Run one worker per GPU until SIGTERM, or until one of them ends: then stop the others too and
    fail, so that a restart policy (compose's, systemd's) brings the whole set back."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    workers = {gpu: subprocess.Popen(argv, env=environment) for gpu, (argv, environment) in pinned.items()}
    try:
        while all(worker.poll() is None for worker in workers.values()):
            time.sleep(1)
        gpu, ended = next((gpu, worker) for gpu, worker in workers.items() if worker.returncode is not None)
        print(f"the worker of GPU {gpu} ended (exit code {ended.returncode}): stopping the others",
              file=sys.stderr, flush=True)
        return 1
    finally:
        _stop(list(workers.values()))


def _serve(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir).resolve() if args.data_dir is not None else None
    given: dict[str, Any] = {"host": args.host, "port": args.port, "data_dir": data_dir}
    # the flags win over the IDAP_* environment, which supplies everything else
    settings = Settings(**{name: value for name, value in given.items() if value is not None})
    # the database, the broker's queue, uploads and artifacts: this user's only
    settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    settings.data_dir.chmod(0o700)

    import uvicorn

    from api.app import create_app
    from domain.db import upgrade

    upgrade(settings.database)
    workers = []
    if not args.no_worker:
        _first_start(settings)
        # One job worker takes both job queues: on a single machine, the CPU/GPU split has nowhere to
        # route to. Webhooks get a worker of their own, so their retries keep to their schedule while a job runs.
        environment = settings.child_environment()
        jobs = f"{settings.cpu_queue},{settings.gpu_queue}"
        workers = [subprocess.Popen(worker_argv(settings, jobs, 1, "prefork", "jobs"), env=environment),
                   subprocess.Popen(worker_argv(settings, settings.webhook_queue, settings.webhook_concurrency,
                                                "threads", "webhooks"), env=environment)]
    # uvicorn re-raises the SIGTERM it caught once it has shut down; exiting through SystemExit
    # (not the default handler's instant death) runs the finally below that stops the workers.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(create_app(settings, start_sandboxes=True), host=settings.host, port=settings.port,
                    log_level="info")
    finally:
        _stop(workers)
    return 0


def _first_start(settings: Settings) -> None:
    """Embedded mode, fresh data directory: create the local tenant with a key and show both secrets once
    (a deployment with separate workers creates its keys with `idap keys create` instead)."""
    from sqlalchemy import select

    from api.services.tenants import LOCAL_TENANT, create_key, get_or_create_tenant
    from domain.db import session_scope
    from domain.models import Tenant

    with session_scope(settings.database) as session:
        if session.scalar(select(Tenant.id).limit(1)) is not None:
            return
        tenant, _ = get_or_create_tenant(session, LOCAL_TENANT)
        key = create_key(session, tenant)
    where = "required" if settings.auth_required else "optional on loopback"
    print(f"First start: created tenant {LOCAL_TENANT!r}. Shown only now:\n"
          f"  API key ({where}): {key}\n  webhook signing secret: {tenant.webhook_secret}", flush=True)


def _stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM to all at once (each finishes its warm shutdown in parallel), then SIGKILL to any still
    running after 30 s."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 30
    for process in running:
        try:
            process.wait(timeout=max(deadline - time.monotonic(), 0))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

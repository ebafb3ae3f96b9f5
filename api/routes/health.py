"""Liveness, readiness (database and broker reachable) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from api.auth import require_metrics_token, sees_internals
from api.deps import QueueDep, SettingsDep
from api.errors import ErrorResponse, error_body
from domain.db import get_engine

router = APIRouter(tags=["health"])


class Health(BaseModel):
    status: str


class Ready(BaseModel):
    status: str
    # each part's state; only for callers who may see them (api.auth.sees_internals)
    checks: dict[str, str] | None = None


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers (no key needed)")
def healthz() -> Health:
    return Health(status="ok")


def _check_database(url: str) -> None:
    with get_engine(url).connect() as connection:
        connection.execute(text("SELECT 1"))


@router.get("/readyz", response_model=Ready, responses={503: {"model": ErrorResponse}},
            summary="Readiness: the database and the broker answer",
            description="With keys required, the checks (which name the parts and their errors) are shown only "
                        "with a valid key or the metrics token.")
async def readyz(request: Request, settings: SettingsDep, queue: QueueDep) -> JSONResponse:
    checks: dict[str, str] = {}
    for name, check in (("database", lambda: _check_database(settings.database)), ("broker", queue.ping)):
        try:
            await run_in_threadpool(check)
            checks[name] = "ok"
        except Exception as exc:  # any failure to connect means not ready; say which and why
            checks[name] = f"{exc.__class__.__name__}: {exc}"
    details = await run_in_threadpool(sees_internals, request, settings)
    if all(value == "ok" for value in checks.values()):
        return JSONResponse({"status": "ready"} | ({"checks": checks} if details else {}))
    failing = "; ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok") if details else \
        ", ".join(k for k, v in checks.items() if v != "ok")
    body = error_body("not_ready", f"Not ready: {failing}", None if details else "Send a key to see the details.")
    return JSONResponse(body | ({"checks": checks} if details else {}), status_code=503)


@router.get("/metrics", response_class=PlainTextResponse, dependencies=[Depends(require_metrics_token)],
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}}},
            summary="Prometheus metrics (with keys required: the metrics token)")
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)

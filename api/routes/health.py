"""Liveness, readiness (database and broker reachable) and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from api.deps import QueueDep, SettingsDep
from api.errors import error_body
from domain.db import get_engine

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _check_database(url: str) -> None:
    with get_engine(url).connect() as connection:
        connection.execute(text("SELECT 1"))


@router.get("/readyz")
async def readyz(settings: SettingsDep, queue: QueueDep) -> JSONResponse:
    checks: dict[str, str] = {}
    for name, check in (("database", lambda: _check_database(settings.database)), ("broker", queue.ping)):
        try:
            await run_in_threadpool(check)
            checks[name] = "ok"
        except Exception as exc:  # any failure to connect means not ready; say which and why
            checks[name] = f"{exc.__class__.__name__}: {exc}"
    if all(value == "ok" for value in checks.values()):
        return JSONResponse({"status": "ready", "checks": checks})
    body = error_body("not_ready", "; ".join(f"{k}: {v}" for k, v in checks.items() if v != "ok"))
    return JSONResponse(body | {"checks": checks}, status_code=503)


@router.get("/metrics")
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)

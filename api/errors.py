"""Every error response has one shape: `{"error": {"code", "message", "hint"}}`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from core.errors import UserError
from domain.read_model import ErrorOut


class ErrorResponse(BaseModel):
    """The body of every error response."""

    error: ErrorOut


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, hint: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.hint, self.headers = status, code, message, hint, headers

    @classmethod
    def from_user_error(cls, err: UserError, status: int = 422) -> ApiError:
        return cls(status, err.code, err.message, err.hint)


def not_found(what: str = "Job") -> ApiError:
    return ApiError(404, "not_found", f"{what} not found.", "Check the id; jobs of other tenants are not visible.")


def error_body(code: str, message: str, hint: str | None = None) -> dict[str, Any]:
    """The one error shape; ErrorOut keeps server paths out of the message and the hint."""
    return {"error": ErrorOut(code=code, message=message, hint=hint).model_dump()}


def describe_validation(errors: list[Any]) -> str:
    parts = []
    for err in errors:
        where = ".".join(str(part) for part in err.get("loc", ()) if part not in ("body", "query", "path"))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts)


# How long a client told the database is busy or unreachable should wait before it tries again.
DATABASE_RETRY_AFTER_S = 5


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.hint), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("invalid_request", describe_validation(list(exc.errors())),
                                       "See the API schema at /docs."), 422)

    @app.exception_handler(PoolTimeout)
    async def _pool_exhausted(_request: Request, _exc: PoolTimeout) -> JSONResponse:
        return JSONResponse(error_body("server_busy", "Every database connection stayed busy past the pool's "
                                       "timeout.", f"Try again in {DATABASE_RETRY_AFTER_S} s."), 503,
                            headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)})

    @app.exception_handler(OperationalError)
    async def _database_unavailable(_request: Request, _exc: OperationalError) -> JSONResponse:
        # unreachable, restarting, or (SQLite) locked past the busy timeout: worth another try, not a bug
        return JSONResponse(error_body("database_unavailable", "The database did not answer.",
                                       f"Try again in {DATABASE_RETRY_AFTER_S} s."), 503,
                            headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)})

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the exception after this answer; the client learns nothing about it
        return JSONResponse(error_body("internal_error", "The server failed to handle this request.",
                                       "Try again; if it keeps failing, ask the operator to check the server log."),
                            500)


class LoopbackHosts:
    """Answers only to loopback host names (localhost, 127.0.0.1, [::1]), any port; anything else is a
    400 in the JSON error shape. Starlette's TrustedHostMiddleware answers in plain text and cannot
    match an IPv6 literal with a port."""

    ALLOWED = frozenset({"localhost", "127.0.0.1", "[::1]"})

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            host = Headers(scope=scope).get("host", "")
            name = host[:host.index("]") + 1] if host.startswith("[") and "]" in host else host.rsplit(":", 1)[0]
            if name.lower() not in self.ALLOWED:
                response = JSONResponse(error_body(
                    "invalid_host", "This server answers only to loopback host names.",
                    "Use http://127.0.0.1:PORT/ or http://localhost:PORT/; to serve other names, run with "
                    "--host and API keys."), 400)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

"""Every error response has one shape: `{"error": {"code", "message", "hint"}}`."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from core.errors import UserError


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
    return {"error": {"code": code, "message": message, "hint": hint}}


def describe_validation(errors: list[Any]) -> str:
    parts = []
    for err in errors:
        where = ".".join(str(part) for part in err.get("loc", ()) if part not in ("body", "query", "path"))
        parts.append(f"{where}: {err.get('msg')}" if where else str(err.get("msg")))
    return "; ".join(parts)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(error_body(exc.code, exc.message, exc.hint), exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("invalid_request", describe_validation(list(exc.errors())),
                                       "See the API schema at /docs."), 422)

    @app.exception_handler(HTTPException)
    async def _http(_request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JSONResponse(error_body(code, str(exc.detail)), exc.status_code, headers=exc.headers)

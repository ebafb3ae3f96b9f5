"""The OpenAPI document and its pages (/openapi.json, /docs): behind a key when keys are required,
and documenting every error as what the API returns, `ErrorResponse` ({"error": {code, message, hint}}),
with the statuses each operation can answer."""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse

from api.auth import CallerDep
from domain.settings import Settings

ERROR_REF = "#/components/schemas/ErrorResponse"

# status -> when it happens (the description in the document)
_EVERYWHERE = {"500": "Internal error (the server failed; nothing about it is in the body)"}
_KEYED = {"401": "No key, or a key that is not valid (for /metrics: not the metrics token)"}
_CHECKED = {"422": "A parameter, header or body field is not valid; the message names it"}
_FOUND = {"404": "No such job (or it belongs to another tenant), or no such artifact"}
_UPLOADS = {
    "400": "The multipart body could not be parsed",
    "413": "A file or form field is larger than the limit",
    "415": "The body is not multipart/form-data",
    "429": "Too many requests at once; try again after Retry-After seconds",
    "503": "The service cannot take the request now (the queue is unreachable, or it is overloaded)",
}
_PAGED = {"400": "The cursor is not one this API handed out"}
_LOOPBACK_ONLY = {"400": "The Host header is not a loopback name (the server runs without keys on loopback)"}


def _errors_of(path: str, operation: dict[str, Any], settings: Settings) -> dict[str, str]:
    errors = dict(_EVERYWHERE)
    if path.startswith("/v1") or (path == "/metrics" and settings.auth_required):
        errors |= _KEYED
    if operation.get("parameters") or operation.get("requestBody"):
        errors |= _CHECKED
    if "{" in path:
        errors |= _FOUND
    if "multipart/form-data" in operation.get("requestBody", {}).get("content", {}):
        errors |= _UPLOADS
    if any(parameter.get("name") == "cursor" for parameter in operation.get("parameters", [])):
        errors |= _PAGED
    if not settings.auth_required:
        errors = _LOOPBACK_ONLY | errors
    return errors


def document(app: FastAPI, settings: Settings) -> dict[str, Any]:
    """The app's OpenAPI document with every 4xx/5xx answer in the one error shape."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    for path, operations in schema["paths"].items():
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            errors = _errors_of(path, operation, settings)
            for status in errors:
                responses.setdefault(status, {})
            for status, response in responses.items():
                if status[0] in "45":
                    response["content"] = {"application/json": {"schema": {"$ref": ERROR_REF}}}
                    response["description"] = errors.get(status) or response.get("description") or status
    components = schema.get("components", {}).get("schemas", {})
    for unused in ("HTTPValidationError", "ValidationError"):
        components.pop(unused, None)
    app.openapi_schema = schema
    return schema


def install(app: FastAPI, settings: Settings) -> None:
    """/openapi.json and /docs; with keys required they need one (the sign-in cookie does for /docs)."""
    app.openapi = lambda: document(app, settings)  # type: ignore[method-assign]

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(_keyed)])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", include_in_schema=False, dependencies=[Depends(_keyed)])
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - API")


def _keyed(_caller: CallerDep) -> None:
    """The caller's key is checked where keys are required (without keys, loopback callers pass)."""

"""/v1/inspect: the preflight alone, nothing stored."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from api.auth import CallerDep
from api.deps import SandboxDep, SettingsDep
from api.errors import ApiError
from api.schemas import InspectConfig
from api.services.intake import admitted, preflight
from api.services.jobs import parse_config, scratch_root
from api.services.uploads import receive_form
from core import PreflightReport
from domain.read_model import ErrorOut

router = APIRouter(prefix="/v1", tags=["inspect"], responses={
    422: {"model": ErrorOut}, 401: {"model": ErrorOut}, 429: {"model": ErrorOut}})

_UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["model"],
    "properties": {"model": {"type": "string", "format": "binary"},
                   "data": {"type": "string", "format": "binary"},
                   "config": {"type": "string", "description": "InspectConfig as JSON"}}}}}}}


@router.post("/inspect", response_model=PreflightReport, openapi_extra=_UPLOAD_SCHEMA,
             summary="Preflight a model (and data) without running a job")
async def inspect(request: Request, settings: SettingsDep, sandbox: SandboxDep, _tenant: CallerDep) -> PreflightReport:
    with admitted(sandbox):
        scratch = Path(tempfile.mkdtemp(prefix="inspect-", dir=scratch_root(settings)))
        try:
            form = await receive_form(request, scratch, {"model", "data"}, settings.max_upload_bytes)
            config: InspectConfig = parse_config(form.fields.get("config", "{}"), InspectConfig)
            if "model" not in form.files:
                raise ApiError(422, "missing_file", "The model file is missing.", "Send it as the form field model.")
            return await preflight(sandbox, settings, config, form.files["model"], form.files.get("data"))
        finally:
            await run_in_threadpool(shutil.rmtree, scratch, True)

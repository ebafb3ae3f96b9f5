"""/v1/jobs: thin routes over api.services.jobs."""

from __future__ import annotations

import base64
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from api.auth import CallerDep
from api.deps import RelayDep, SandboxDep, SessionDep, SettingsDep, StorageDep
from api.schemas import JobList, WebhookDeliveryList, WebhookDeliveryOut
from api.services import events, jobs
from core import Report
from domain.config import JobConfig
from domain.read_model import ErrorOut, JobOut, job_out
from domain.states import JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses={
    401: {"model": ErrorOut}, 404: {"model": ErrorOut}, 422: {"model": ErrorOut}})

_UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object",
            "required": ["model", "data", "config"],
            "properties": {
                "model": {"type": "string", "format": "binary",
                          "description": ".safetensors (with config.architecture), .onnx, or a Hugging Face .zip"},
                "data": {"type": "string", "format": "binary", "description": "calibration data, e.g. .npz"},
                "config": {"type": "string", "description": "JobConfig as JSON",
                           "contentMediaType": "application/json"},
            },
        }}},
    }
}


@router.post("", status_code=202, response_model=JobOut, openapi_extra=_UPLOAD_SCHEMA,
             summary="Submit a compression job",
             responses={413: {"model": ErrorOut}, 429: {"model": ErrorOut}, 503: {"model": ErrorOut}},
             description=f"config: `{JobConfig.__name__}` (see schemas). Returns 200 with the earlier job when "
             "config.idempotency_key was used before. A 202 job is queued even while the broker is down: it is "
             "sent when the broker is back.")
async def submit(request: Request, response: Response, settings: SettingsDep, storage: StorageDep,
                 sandbox: SandboxDep, relay: RelayDep, tenant: CallerDep) -> JobOut:
    job, created = await jobs.create_job(request, settings, storage, sandbox, relay, tenant)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    if not created:
        response.status_code = 200
    return job_out(job, str(request.base_url))


@router.get("", response_model=JobList, summary="List jobs, newest first")
def list_jobs(request: Request, session: SessionDep, tenant: CallerDep,
              status: JobStatus | None = None,
              cursor: str | None = None, limit: Annotated[int, Query(ge=1, le=200)] = 50) -> JobList:
    return jobs.list_jobs(session, tenant, status, cursor, limit, str(request.base_url))


@router.get("/{job_id}", response_model=JobOut)
def get_job(request: Request, job_id: str, session: SessionDep, tenant: CallerDep) -> JobOut:
    return job_out(jobs.get_job(session, tenant, job_id), str(request.base_url))


@router.post("/{job_id}/cancel", status_code=202, response_model=JobOut, responses={409: {"model": ErrorOut}})
def cancel(request: Request, job_id: str, session: SessionDep, tenant: CallerDep) -> JobOut:
    return job_out(jobs.cancel_job(session, tenant, job_id), str(request.base_url))


@router.delete("/{job_id}", status_code=204, responses={409: {"model": ErrorOut}})
def delete(job_id: str, session: SessionDep, storage: StorageDep, tenant: CallerDep) -> Response:
    jobs.delete_job(session, storage, tenant, job_id)
    return Response(status_code=204)


@router.get("/{job_id}/events", summary="Progress and status changes as Server-Sent Events",
            response_class=StreamingResponse, responses={200: {"content": {"text/event-stream": {}}}})
def job_events(job_id: str, session: SessionDep, settings: SettingsDep, tenant: CallerDep,
               last_event_id: Annotated[int, Header(ge=0, le=2**62)] = 0) -> StreamingResponse:
    job = jobs.get_job(session, tenant, job_id)
    return StreamingResponse(events.stream(settings.database, job.id, last_event_id), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


@router.get("/{job_id}/artifacts/{name}", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}}})
def artifact(job_id: str, name: str, session: SessionDep, storage: StorageDep, tenant: CallerDep) -> Response:
    found = jobs.get_artifact(session, tenant, job_id, name)
    digest = base64.b64encode(bytes.fromhex(found.sha256)).decode()
    media = "application/json" if name.endswith(".json") else "application/octet-stream"
    return StreamingResponse(storage.iter_bytes(found.storage_key), media_type=media, headers={
        "Content-Length": str(found.size), "ETag": f'"{found.sha256}"', "Repr-Digest": f"sha-256=:{digest}:",
        "X-Checksum-Sha256": found.sha256, "Content-Disposition": f'attachment; filename="{found.name}"'})


@router.get("/{job_id}/report", response_model=Report, summary="The job's report (report.json), typed",
            description="404 until the job has succeeded.")
def report(job_id: str, session: SessionDep, storage: StorageDep, tenant: CallerDep) -> Report:
    return jobs.get_report(session, storage, tenant, job_id)


@router.get("/{job_id}/webhooks", response_model=WebhookDeliveryList, summary="Webhook delivery attempts")
def webhooks(job_id: str, session: SessionDep, tenant: CallerDep) -> WebhookDeliveryList:
    rows = jobs.webhook_deliveries(session, tenant, job_id)
    return WebhookDeliveryList(deliveries=[WebhookDeliveryOut.model_validate(row, from_attributes=True)
                                           for row in rows])

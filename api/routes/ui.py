"""The browser UI: server-rendered pages over the same services as /v1 (api.services.jobs).

Pages that change nothing are rendered here; jobs are created, previewed and cancelled by ui.js
through the REST endpoints, with the sign-in cookie as the credential.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from sqlalchemy.orm import Session

from api.auth import COOKIE, OptionalCallerDep, check_csrf
from api.deps import SessionDep, SettingsDep, StorageDep
from api.errors import ApiError
from api.services import jobs, queue
from api.services.tenants import tenant_for_key
from api.ui.charts import charts
from api.ui.render import error_page, page
from api.ui.tasks import task_choices
from core import Report
from domain import states
from domain.models import Tenant
from domain.read_model import job_out
from domain.settings import Settings
from domain.states import JobStatus
from domain.storage import Storage

router = APIRouter(include_in_schema=False)
COOKIE_MAX_AGE_S = 7 * 24 * 3600
PAGE_SIZE = 20


def _to_signin(request: Request) -> RedirectResponse:
    response = RedirectResponse(f"/ui/signin?next={quote(request.url.path)}", status_code=303)
    # a cookie that no longer authenticates (key revoked) would only keep failing
    response.delete_cookie(COOKIE, path="/")
    return response


def _safe_next(target: str | None) -> str:
    """Only a page of this UI, never another site (an open redirect)."""
    return target if target and target.startswith("/ui/") and not target.startswith("//") else "/ui/jobs"


def _refuse_cross_site(request: Request, settings: Settings) -> ApiError | None:
    """Sign-in and sign-out forms too must come from this server's pages (a forged sign-in would
    put the victim's browser in the attacker's tenant)."""
    try:
        check_csrf(request, settings, cookie=True)
    except ApiError as err:
        return err
    return None


@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/ui/jobs", status_code=303)


@router.get("/ui/signin", response_class=HTMLResponse)
def signin_form(request: Request, settings: SettingsDep, next: str | None = None) -> Response:
    return page(request, "signin.html", settings, None, page_name="signin", next=_safe_next(next))


@router.post("/ui/signin", response_class=HTMLResponse)
def signin(request: Request, session: SessionDep, settings: SettingsDep, key: Annotated[str, Form()] = "",
           next: Annotated[str, Form()] = "") -> Response:
    refused = _refuse_cross_site(request, settings)
    if refused is not None:
        return error_page(request, settings, None, refused)
    tenant = tenant_for_key(session, key.strip()) if key.strip() else None
    if tenant is None:
        return page(request, "signin.html", settings, None, status_code=401, page_name="signin",
                    next=_safe_next(next), error="That API key is not valid. Copy it again from the output of "
                    "idap keys create --tenant NAME (or of the first start of idap serve).")
    response = RedirectResponse(_safe_next(next), status_code=303)
    secure = request.url.scheme == "https" or (settings.public_url or "").startswith("https://")
    response.set_cookie(COOKIE, key.strip(), max_age=COOKIE_MAX_AGE_S, path="/", httponly=True, samesite="strict",
                        secure=secure)
    return response


@router.post("/ui/signout")
def signout(request: Request, settings: SettingsDep) -> Response:
    refused = _refuse_cross_site(request, settings)
    if refused is not None:
        return error_page(request, settings, None, refused)
    response = RedirectResponse("/ui/signin", status_code=303)
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/ui/jobs", response_class=HTMLResponse)
def jobs_page(request: Request, session: SessionDep, settings: SettingsDep, tenant: OptionalCallerDep,
              status: str | None = None, cursor: str | None = None) -> Response:
    if tenant is None:
        return _to_signin(request)
    status = status if status in tuple(JobStatus) else None
    try:
        listing = jobs.list_jobs(session, tenant, status, cursor or None, PAGE_SIZE, "")
    except ApiError as err:
        return error_page(request, settings, tenant, err)
    return page(request, "jobs.html", settings, tenant, page_name="jobs", listing=listing, status=status,
                statuses=tuple(JobStatus), first_page=cursor is not None,
                gpu_workers=queue.gpu_workers_live(session, settings))


@router.get("/ui/jobs/new", response_class=HTMLResponse)
def new_job_page(request: Request, settings: SettingsDep, tenant: OptionalCallerDep) -> Response:
    if tenant is None:
        return _to_signin(request)
    return page(request, "new.html", settings, tenant, page_name="new-job", tasks=task_choices())


@router.get("/ui/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str, session: SessionDep, settings: SettingsDep, storage: StorageDep,
             tenant: OptionalCallerDep) -> Response:
    if tenant is None:
        return _to_signin(request)
    try:
        job = jobs.get_job(session, tenant, job_id)
    except ApiError as err:
        return error_page(request, settings, tenant, err)
    report = _report(session, storage, tenant, job_id) if job.status == JobStatus.SUCCEEDED else None
    return page(request, "job.html", settings, tenant, page_name="job", job=job_out(job, ""), report=report,
                charts=charts(report) if report else [], terminal=job.status in states.TERMINAL)


def _report(session: Session, storage: Storage, tenant: Tenant, job_id: str) -> Report | None:
    """None when the job has no report.json: the page still shows the job and whatever artifacts it has."""
    try:
        return jobs.get_report(session, storage, tenant, job_id)
    except ApiError:
        return None

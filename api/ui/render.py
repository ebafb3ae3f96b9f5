"""Jinja2 templates for the pages, their number formats, and the headers every page carries."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import HTMLResponse
from starlette.templating import Jinja2Templates

from api.auth import COOKIE
from api.errors import ApiError
from core.report import Report, ReportHeadline
from core.tasks.kinds import Metric
from domain.config import MAX_JOB_NAME
from domain.models import Tenant
from domain.settings import Settings

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")  # autoescapes .html

# Pages load nothing from elsewhere and run only ui.js; charts are inline SVG (not scripts), and
# progress bars are <progress> elements, so no inline style or script needs allowing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    # same-origin keeps the Referer the CSRF check can fall back on, and sends none elsewhere
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def si(value: float | None, unit: str = "") -> str:
    if value is None:
        return "–"
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {suffix}{unit}"
    return f"{value:.3g} {unit}".rstrip()


def percent(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value * 100:.{digits}f} %"


def minus(text: str) -> str:
    """Signed numbers with a typographic minus."""
    return text.replace("-", "−")


def metric_value(value: float | None, metric: Metric) -> str:
    """A value of the task's metric: a percentage for fractions (top-1, mIoU, ...), a plain number for perplexity."""
    return "–" if value is None else metric.show(value)


def metric_change(metrics: Report | ReportHeadline | None) -> str:
    """The change of the task's metric in its budget's units: points, or percent of the original (perplexity)."""
    if metrics is None:
        return "–"
    return minus(metrics.accuracy_metric.show_change(metrics.accuracy_before, metrics.accuracy_after))


def size(value: float | None) -> str:
    if value is None:
        return "–"
    for factor, suffix in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if value >= factor:
            return f"{value / factor:.1f} {suffix}"
    return f"{value:.0f} B"


def when(value: datetime | None) -> str:
    return "–" if value is None else value.strftime("%Y-%m-%d %H:%M UTC")


templates.env.filters.update(si=si, percent=percent, size=size, when=when, metric_value=metric_value,
                             metric_change=metric_change)


def page(request: Request, name: str, settings: Settings, tenant: Tenant | None, status_code: int = 200,
         **context: Any) -> HTMLResponse:
    context |= {
        "tenant": tenant,
        "signed_in": COOKIE in request.cookies,
        "local_mode": not settings.auth_required,
        "max_upload_bytes": settings.max_upload_bytes,
        "max_job_name": MAX_JOB_NAME,
    }
    return templates.TemplateResponse(request, name, context, status_code=status_code, headers=SECURITY_HEADERS)


def error_page(request: Request, settings: Settings, tenant: Tenant | None, err: ApiError) -> HTMLResponse:
    return page(request, "error.html", settings, tenant, status_code=err.status, page_name="error", error=err)

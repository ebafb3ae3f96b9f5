"""Webhooks signed per Standard Webhooks (webhook-id, webhook-timestamp, webhook-signature).

Each attempt is recorded; timeouts, connection errors and 5xx are retried on the configured
schedule, anything else is final. URLs resolving to private, loopback or link-local addresses are
refused (the server would otherwise probe its own network on a user's behalf) unless allowed.
"""

from __future__ import annotations

import ipaddress
import json
import socket
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from domain.models import WebhookDelivery, new_id

EVENTS = ("job.started", "job.succeeded", "job.failed", "job.cancelled")


class WebhookUrlError(ValueError):
    pass


def check_url(url: str, allow_private: bool) -> None:
    """Raise WebhookUrlError unless `url` is http(s) and every address it resolves to is public."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookUrlError(f"{url!r} is not an http(s) URL.")
    if allow_private:
        return
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80),
                                   proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookUrlError(f"The host of {url!r} does not resolve ({exc}).") from exc
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if not address.is_global or address.is_multicast:
            raise WebhookUrlError(f"{parts.hostname} resolves to the non-public address {address}.")


def new_event(event_type: str, job: dict[str, Any]) -> tuple[str, str]:
    """(webhook-id, body); the id stays the same across retries so receivers can deduplicate."""
    body = {"type": event_type, "timestamp": datetime.now(UTC).isoformat(), "data": job}
    return "msg_" + new_id(), json.dumps(body, default=str)


def _send(url: str, secret: str, event_id: str, body: str, timeout: float) -> tuple[int | None, str | None]:
    now = datetime.now(UTC)
    headers = {
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(event_id, now, body),
    }
    try:
        response = httpx.post(url, content=body.encode(), headers=headers, timeout=timeout, follow_redirects=False)
    except httpx.HTTPError as exc:
        return None, f"{exc.__class__.__name__}: {exc}"
    return response.status_code, None if response.is_success else f"HTTP {response.status_code}"


def attempt(session: Session, *, job_id: str, url: str, secret: str, event_type: str, event_id: str, body: str,
            attempt_no: int, schedule: list[float], timeout: float, allow_private: bool) -> float | None:
    """One delivery attempt, recorded. Returns the delay before the next attempt, or None when done."""
    try:
        check_url(url, allow_private)  # again at delivery: DNS may have changed since the job was accepted
        status, error = _send(url, secret, event_id, body, timeout)
    except WebhookUrlError as exc:
        status, error = None, str(exc)
        retryable = False
    else:
        retryable = error is not None and (status is None or status >= 500)
    delay = schedule[attempt_no - 1] if retryable and attempt_no <= len(schedule) else None
    session.add(WebhookDelivery(job_id=job_id, event_id=event_id, event_type=event_type, url=url,
                                attempt=attempt_no, status_code=status, error=error, succeeded=error is None,
                                will_retry=delay is not None))
    session.commit()
    return delay

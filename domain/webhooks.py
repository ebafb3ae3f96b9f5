"""Webhooks signed per Standard Webhooks (webhook-id, webhook-timestamp, webhook-signature).

Each attempt is recorded; timeouts, connection errors and 5xx are retried on the configured
schedule, anything else is final. The receiver's name is resolved once per attempt, every address
it resolves to must be public (domain.addresses) unless private addresses are allowed, and the
request goes to the address that was checked, with the URL's host in the Host header and TLS SNI
(and the certificate checked against that host): a name that resolves to a public address for the
check and to an internal one for the connection (DNS rebinding) has no second lookup to change.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from ipaddress import ip_address
from typing import Any
from urllib.parse import SplitResult, urlsplit

import httpx
from sqlalchemy.orm import Session
from standardwebhooks import Webhook

from domain.addresses import IPAddress, refusal
from domain.models import WebhookDelivery, new_id

EVENTS = ("job.started", "job.succeeded", "job.failed", "job.cancelled")


class WebhookUrlError(ValueError):
    pass


@dataclass(frozen=True)
class Target:
    """A webhook URL resolved once: where to connect, and what to name the host as."""

    parts: SplitResult
    address: IPAddress

    def url(self) -> str:
        """The URL to connect to: the checked address in place of the host name."""
        host = f"[{self.address}]" if self.address.version == 6 else str(self.address)
        userinfo = self.parts.netloc.rpartition("@")[0]
        netloc = (userinfo + "@" if userinfo else "") + host + (f":{self.parts.port}" if self.parts.port else "")
        return self.parts._replace(netloc=netloc).geturl()

    def host_header(self) -> str:
        host = self.parts.hostname or ""
        host = f"[{host}]" if ":" in host else host
        return host + (f":{self.parts.port}" if self.parts.port else "")


def resolve(url: str, allow_private: bool) -> Target:
    """Resolve `url`'s host once and pick the address to connect to; WebhookUrlError unless it is
    http(s) and every address the host resolves to is public (any address goes with `allow_private`)."""
    parts = urlsplit(url)
    try:
        port = parts.port
    except ValueError as exc:
        raise WebhookUrlError(f"{url!r} has an invalid port.") from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookUrlError(f"{url!r} is not an http(s) URL.")
    try:
        infos = socket.getaddrinfo(parts.hostname, port or (443 if parts.scheme == "https" else 80),
                                   proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise WebhookUrlError(f"The host of {url!r} does not resolve ({exc}).") from exc
    addresses = [ip_address(str(info[4][0])) for info in infos]
    if not addresses:
        raise WebhookUrlError(f"The host of {url!r} does not resolve.")
    for address in [] if allow_private else addresses:
        if (why := refusal(address)) is not None:
            raise WebhookUrlError(f"{parts.hostname} resolves to the non-public address {address}: {why}.")
    return Target(parts, addresses[0])


def check_url(url: str, allow_private: bool) -> None:
    """Raise WebhookUrlError unless `url` is http(s) and every address it resolves to is public."""
    resolve(url, allow_private)


def new_event(event_type: str, job: dict[str, Any]) -> tuple[str, str]:
    """(webhook-id, body); the id stays the same across retries so receivers can deduplicate."""
    body = {"type": event_type, "timestamp": datetime.now(UTC).isoformat(), "data": job}
    return "msg_" + new_id(), json.dumps(body, default=str)


def _send(target: Target, secret: str, event_id: str, body: str, timeout: float) -> tuple[int | None, str | None]:
    now = datetime.now(UTC)
    headers = {
        "host": target.host_header(),
        "content-type": "application/json",
        "webhook-id": event_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": Webhook(secret).sign(event_id, now, body),
    }
    # SNI and the certificate check name the URL's host, not the address connected to
    extensions = {"sni_hostname": target.parts.hostname} if target.parts.scheme == "https" else {}
    try:
        # no proxies from the environment: a proxy would resolve the name again
        with httpx.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
            response = client.post(target.url(), content=body.encode(), headers=headers, extensions=extensions)
    except httpx.HTTPError as exc:
        return None, f"{exc.__class__.__name__}: {exc}"
    return response.status_code, None if response.is_success else f"HTTP {response.status_code}"


def attempt(session: Session, *, job_id: str, url: str, secret: str, event_type: str, event_id: str, body: str,
            attempt_no: int, schedule: list[float], timeout: float, allow_private: bool) -> float | None:
    """One delivery attempt, recorded. Returns the delay before the next attempt, or None when done."""
    try:
        # resolved and checked again at delivery (DNS may have changed since the job was accepted),
        # and the request goes to the address checked
        status, error = _send(resolve(url, allow_private), secret, event_id, body, timeout)
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

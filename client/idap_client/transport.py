"""HTTP with retries: connection errors, 429 and 503 are retried with exponential backoff (with
jitter), waiting at least what the server's Retry-After asks for."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx

from idap_client.errors import ApiError, IdapError, ServerUnavailable

T = TypeVar("T")
RETRY_STATUSES = frozenset({429, 503})


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 6  # in all, the first one included
    backoff: float = 0.5  # seconds before the first retry; doubles with each retry
    max_delay: float = 60.0  # no wait, Retry-After included, is longer than this


class _Retryable(Exception):
    def __init__(self, reason: str, retry_after: float | None = None) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


def retry_after(response: httpx.Response) -> float | None:
    """Retry-After in seconds, from its delta-seconds or HTTP-date form; None when absent or unreadable."""
    value = response.headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - datetime.now(timezone.utc)).total_seconds())


def api_error(response: httpx.Response) -> ApiError:
    """The server's `{"error": {...}}`, or a description of whatever else it answered."""
    try:
        body: Any = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and "message" in error:
        return ApiError(response.status_code, str(error.get("code", "error")), str(error["message"]),
                        error.get("hint"))
    detail = body.get("detail") if isinstance(body, dict) else None
    text = str(detail) if detail is not None else response.text.strip()[:500]
    return ApiError(response.status_code, "http_error", f"HTTP {response.status_code} from {response.request.url}: "
                    f"{text or response.reason_phrase}")


class Transport:
    """One httpx.Client (given, or made for `base_url`), the API key, and the retry policy."""

    def __init__(self, base_url: str, api_key: str | None, *, timeout: float, retry: RetryPolicy,
                 http: httpx.Client | None = None, sleep: Callable[[float], None] = time.sleep) -> None:
        self.base_url = base_url.rstrip("/")
        self.http = http if http is not None else httpx.Client(timeout=timeout)
        self.headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.retry = retry
        self.sleep = sleep

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def call(self, attempt: Callable[[], T]) -> T:
        """Runs `attempt` until it returns, retrying while it raises _Retryable (see `check`)."""
        for number in range(self.retry.attempts):
            try:
                return attempt()
            except _Retryable as exc:
                if number == self.retry.attempts - 1:
                    raise ServerUnavailable(f"{exc} (gave up after {self.retry.attempts} attempts)") from exc
                delay = min(self.retry.max_delay, self.retry.backoff * 2 ** number * random.uniform(0.5, 1.0))
                if exc.retry_after is not None:
                    delay = min(self.retry.max_delay, max(delay, exc.retry_after))
                self.sleep(delay)
        raise IdapError("no attempt was made: RetryPolicy.attempts must be at least 1")

    def check(self, response: httpx.Response) -> httpx.Response:
        """Raises _Retryable for 429/503, ApiError for any other error status; returns a success."""
        if response.status_code in RETRY_STATUSES:
            response.read()
            raise _Retryable(str(api_error(response)), retry_after(response))
        if response.is_error:
            response.read()
            raise api_error(response)
        return response

    def request(self, method: str, path: str, *, body: Callable[[], dict[str, Any]] | None = None,
                headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        """One API call with retries. `body` makes the request's content anew for each attempt (files
        are reopened, so a retried upload sends them whole again)."""

        def attempt() -> httpx.Response:
            content = body() if body is not None else {}
            try:
                response = self.http.request(method, self.url(path), headers=self.headers | (headers or {}),
                                             **kwargs, **content)
            except httpx.UnsupportedProtocol:
                raise
            except httpx.TransportError as exc:
                raise _Retryable(f"{type(exc).__name__} on {method} {self.url(path)}: {exc}") from exc
            finally:
                for value in content.get("files", {}).values():
                    value[1].close()
            return self.check(response)

        return self.call(attempt)

    def download(self, path: str, to: Path) -> tuple[int, str]:
        """Streams GET `path` into the file `to` (rewritten whole on a retry); returns its size and SHA-256."""

        def attempt() -> tuple[int, str]:
            digest, size = hashlib.sha256(), 0
            try:
                with self.http.stream("GET", self.url(path), headers=self.headers) as response, to.open("wb") as out:
                    self.check(response)
                    for chunk in response.iter_bytes(1 << 20):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
            except httpx.UnsupportedProtocol:
                raise
            except httpx.TransportError as exc:
                raise _Retryable(f"{type(exc).__name__} on GET {self.url(path)}: {exc}") from exc
            return size, digest.hexdigest()

        return self.call(attempt)

"""Who is calling: `Authorization: Bearer <key>` names the tenant, or, for the browser UI, the same
key kept in the `idap_key` cookie (HttpOnly, SameSite=Strict) that the sign-in page sets.

Without a key, a server listening only on loopback treats the caller as the local tenant
(one user, one machine); any other server answers 401.

A browser sends the cookie by itself, and a loopback server needs no key at all, so a
state-changing request authenticated either way must come from this site's own pages: its
Origin (or Referer) has to name this server. A Bearer header cannot be forged cross-site.
"""

from __future__ import annotations

import hmac
from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request

from api.deps import SessionDep, SettingsDep
from api.errors import ApiError
from api.services.tenants import LOCAL_TENANT, get_or_create_tenant, tenant_for_key
from domain.db import get_sessionmaker
from domain.models import Tenant
from domain.settings import Settings

COOKIE = "idap_key"
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def same_origin(request: Request, settings: Settings) -> bool | None:
    """Whether the Origin (else Referer) header names this server; None when the browser sent neither."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source:
        return None
    # Host only: behind a TLS-terminating proxy the scheme the app sees differs from the browser's.
    allowed = {request.url.netloc} | ({urlsplit(settings.public_url).netloc} if settings.public_url else set())
    return urlsplit(source).netloc in allowed


def check_csrf(request: Request, settings: Settings, *, cookie: bool) -> None:
    """Refuse a cross-site state-changing request; with the cookie, an unnamed origin is refused too
    (browsers always send Origin on POST; the loopback mode also serves curl, which sends none)."""
    if request.method in _SAFE_METHODS:
        return
    verdict = same_origin(request, settings)
    if verdict is False or (verdict is None and cookie):
        raise ApiError(403, "cross_site_request", "The request did not come from this server's own pages.",
                       "Reload the page and try again; API clients send `Authorization: Bearer <key>` instead.")


def _caller(request: Request, session: SessionDep, settings: SettingsDep) -> Tenant:
    header = request.headers.get("authorization")
    cookie = request.cookies.get(COOKIE)
    if header is None and not cookie:
        if settings.auth_required:
            raise ApiError(401, "unauthorized", "An API key is required.",
                           "Send `Authorization: Bearer <key>`; create a key with `idap keys create --tenant NAME`.",
                           _CHALLENGE)
        check_csrf(request, settings, cookie=False)
        local, _created = get_or_create_tenant(session, LOCAL_TENANT)
        session.commit()  # see below
        return local
    if header is not None:
        scheme, _, key = header.partition(" ")
        tenant = tenant_for_key(session, key.strip()) if scheme.lower() == "bearer" else None
    else:
        check_csrf(request, settings, cookie=True)
        tenant = tenant_for_key(session, cookie or "")
    if tenant is None:
        hint = ("Send `Authorization: Bearer <key>` with a key from `idap keys create`." if header is not None
                else "Sign in again at /ui/signin with a key from `idap keys create`.")
        raise ApiError(401, "unauthorized", "The API key is not valid.", hint, _CHALLENGE)
    # Ends the lookup's transaction, which gives its connection back to the pool: an upload route
    # must not hold one while the body streams in or a sandbox checks it (the tenant stays loaded).
    session.commit()
    return tenant


def _caller_or_none(request: Request, session: SessionDep, settings: SettingsDep) -> Tenant | None:
    """For pages: None where the API would answer 401, so the page can send the browser to sign in."""
    try:
        return _caller(request, session, settings)
    except ApiError as err:
        if err.status == 401:
            return None
        raise


CallerDep = Annotated[Tenant, Depends(_caller)]
OptionalCallerDep = Annotated[Tenant | None, Depends(_caller_or_none)]


def _bearer(request: Request) -> str | None:
    scheme, _, token = (request.headers.get("authorization") or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def has_metrics_token(request: Request, settings: Settings) -> bool:
    token, expected = _bearer(request), settings.metrics_token
    return bool(expected and token and hmac.compare_digest(token.encode(), expected.encode()))


def require_metrics_token(request: Request, settings: SettingsDep) -> None:
    """/metrics counts every tenant's jobs: with keys required, only the operator's metrics token sees them."""
    if settings.auth_required and not has_metrics_token(request, settings):
        raise ApiError(401, "unauthorized", "The metrics need the metrics token.",
                       "Send `Authorization: Bearer <IDAP_METRICS_TOKEN>`; the operator sets IDAP_METRICS_TOKEN.",
                       _CHALLENGE)


def sees_internals(request: Request, settings: Settings) -> bool:
    """Whether the caller may see how the service's parts are doing (/readyz's checks): anyone
    without keys; with keys, the metrics token or any valid key (looked up only when one is sent,
    and a database that cannot look it up answers no)."""
    if not settings.auth_required or has_metrics_token(request, settings):
        return True
    key = _bearer(request) or request.cookies.get(COOKIE)
    if not key:
        return False
    try:
        with get_sessionmaker(settings.database)() as session:
            return tenant_for_key(session, key) is not None
    except Exception:  # the database is down: no key can be checked
        return False

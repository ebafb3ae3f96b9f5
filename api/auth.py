"""Who is calling: `Authorization: Bearer <key>` names the tenant.

Without a key, a server listening only on loopback treats the caller as the local tenant
(one user, one machine); any other server answers 401.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from api.deps import SessionDep, SettingsDep
from api.errors import ApiError
from api.models import Tenant
from api.services.tenants import LOCAL_TENANT, get_or_create_tenant, tenant_for_key

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _caller(request: Request, session: SessionDep, settings: SettingsDep) -> Tenant:
    header = request.headers.get("authorization")
    if header is None:
        if settings.auth_required:
            raise ApiError(401, "unauthorized", "An API key is required.",
                           "Send `Authorization: Bearer <key>`; create a key with `idap keys create --tenant NAME`.",
                           _CHALLENGE)
        tenant, created = get_or_create_tenant(session, LOCAL_TENANT)
        if created:
            session.commit()
        return tenant
    scheme, _, key = header.partition(" ")
    tenant = tenant_for_key(session, key.strip()) if scheme.lower() == "bearer" else None
    if tenant is None:
        raise ApiError(401, "unauthorized", "The API key is not valid.",
                       "Send `Authorization: Bearer <key>` with a key from `idap keys create`.", _CHALLENGE)
    return tenant


CallerDep = Annotated[Tenant, Depends(_caller)]

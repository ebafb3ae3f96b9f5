"""Tenants, their API keys (stored only as hashes) and their webhook signing secrets."""

from __future__ import annotations

import base64
import hashlib
import secrets

from sqlalchemy import select
from sqlalchemy.orm import Session

from domain.models import ApiKey, Tenant

KEY_PREFIX = "idap_"
# Requests without a key on a loopback-only server act as this tenant.
LOCAL_TENANT = "local"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_webhook_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


def get_or_create_tenant(session: Session, name: str) -> tuple[Tenant, bool]:
    """(tenant, created). A new tenant gets its webhook secret here; the caller shows it once."""
    tenant = session.scalar(select(Tenant).where(Tenant.name == name))
    if tenant is not None:
        return tenant, False
    tenant = Tenant(name=name, webhook_secret=new_webhook_secret())
    session.add(tenant)
    session.flush()
    return tenant, True


def create_key(session: Session, tenant: Tenant) -> str:
    """A new key for `tenant`; only its hash is stored, so this is the one time it is seen."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    session.add(ApiKey(tenant_id=tenant.id, key_hash=hash_key(key), prefix=key[:12]))
    session.flush()
    return key


def tenant_for_key(session: Session, key: str) -> Tenant | None:
    api_key = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key)))
    return api_key.tenant if api_key is not None else None

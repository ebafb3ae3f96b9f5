"""A property-based run over the OpenAPI document (schemathesis): requests generated from the
document, valid and not, to every operation, with a tenant's key; no answer may be a 5xx, and
every answer must match what the document says (status code, content type, body schema, headers).
Bounded: a few examples per operation, derandomized so that a failure repeats."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from api.app import create_app
from domain.settings import Settings
from tests.service.helpers import auth

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          response_headers_conformance]


# The document is the one an app with keys required serves (the data directory plays no part in it);
# the calls go to the session's app (the `client` fixture), on the test database and broker.
schema = schemathesis.openapi.from_dict(
    create_app(Settings(require_auth=True, data_dir=Path(tempfile.mkdtemp(prefix="idap-openapi-")))).openapi())


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_the_api_answers_as_documented(case: Any, client: TestClient, keys: dict[str, str]) -> None:
    case.call_and_validate(app=client.app, headers=auth(keys["a"]), checks=CHECKS)

"""What the service shows, and to whom: with keys required, the metrics, the readiness details and
the API documents need a key (liveness does not); every error, 500 included, has the JSON error
shape the OpenAPI document describes; no message names a server path; the SQLite files are 0600."""

from __future__ import annotations

import io
import json
import stat
import zipfile
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api.app import create_app
from domain.db import get_engine, upgrade
from domain.redact import without_paths
from domain.settings import Settings
from tests.service.helpers import auth, submit


def _shape(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) >= {"error"} and {"code", "message", "hint"} == set(body["error"]), body
    return body["error"]


def test_with_keys_required_the_internals_need_a_key(client: TestClient, keys: dict[str, str],
                                                     settings: Settings) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}, "the liveness probe needs no key"
    assert client.get("/readyz").json() == {"status": "ready"}, "no details without a key"
    assert "checks" in client.get("/readyz", headers=auth(keys["b"])).json()
    assert "checks" in client.get("/readyz", headers=auth(settings.metrics_token or "")).json()
    for path in ("/docs", "/openapi.json"):
        assert _shape(client.get(path), 401)["code"] == "unauthorized"
        assert _shape(client.get(path, headers=auth("idap_wrong")), 401)["code"] == "unauthorized"
    assert client.get("/redoc").status_code == 404
    # the metrics count every tenant's jobs: a tenant's key is not enough, the operator's token is
    for headers in ({}, auth(keys["a"]), auth("metrics-token-guessed")):
        assert _shape(client.get("/metrics", headers=headers), 401)["code"] == "unauthorized"
    assert "idap_jobs" in client.get("/metrics", headers=auth(settings.metrics_token or "")).text


def test_readiness_details_name_the_broker_only_to_a_key(settings: Settings, keys: dict[str, str]) -> None:
    with TestClient(create_app(settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"}))) as client:
        anonymous = client.get("/readyz")
        assert "127.0.0.1:1" not in anonymous.text and "checks" not in anonymous.json()
        assert _shape(anonymous, 503)["message"] == "Not ready: broker"
        keyed = client.get("/readyz", headers=auth(keys["a"]))
        assert _shape(keyed, 503)["code"] == "not_ready" and keyed.json()["checks"]["broker"] != "ok"


def test_without_keys_on_loopback_everything_is_open_but_other_hosts_get_a_json_400(tmp_path: Path) -> None:
    local = Settings(data_dir=tmp_path, host="127.0.0.1")
    upgrade(local.database)
    with TestClient(create_app(local), base_url="http://127.0.0.1:8000") as client:
        assert client.get("/openapi.json").status_code == 200
        assert "checks" in client.get("/readyz").json()
        assert client.get("/metrics").status_code == 200
        for host in ("localhost:8000", "[::1]:8000", "127.0.0.1"):
            assert client.get("/healthz", headers={"host": host}).status_code == 200, host
        for host in ("evil.example", "127.0.0.1.evil.example:8000", ""):
            assert _shape(client.get("/healthz", headers={"host": host}), 400)["code"] == "invalid_host"


def test_a_500_has_the_json_error_shape(settings: Settings) -> None:
    app: FastAPI = create_app(settings)

    @app.get("/v1/boom")
    def boom() -> None:
        raise RuntimeError("/secret/path/in/the/exception")

    with TestClient(app, raise_server_exceptions=False) as client:
        error = _shape(client.get("/v1/boom"), 500)
    assert error["code"] == "internal_error" and "secret" not in json.dumps(error)


def test_openapi_documents_the_error_shape_and_statuses(client: TestClient, keys: dict[str, str]) -> None:
    openapi = client.get("/openapi.json", headers=auth(keys["a"])).json()
    schemas = openapi["components"]["schemas"]
    assert schemas["ErrorResponse"]["required"] == ["error"]
    assert schemas["ErrorResponse"]["properties"]["error"]["$ref"].endswith("/ErrorOut")
    assert "HTTPValidationError" not in schemas
    for path, operations in openapi["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status[0] in "45":
                    assert response["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse"), \
                        (path, method, status)
            assert "500" in operation["responses"], (path, method)
    submit_op = openapi["paths"]["/v1/jobs"]["post"]["responses"]
    assert {"400", "401", "413", "415", "422", "429", "503"} <= set(submit_op)
    assert {"400", "415", "422"} <= set(openapi["paths"]["/v1/inspect"]["post"]["responses"])
    assert "400" in openapi["paths"]["/v1/jobs"]["get"]["responses"]  # a cursor it did not hand out


def test_server_paths_never_reach_a_message(client: TestClient, keys: dict[str, str], digits: tuple[Path, Path],
                                            settings: Settings) -> None:
    model, _ = digits
    broken = io.BytesIO()
    with zipfile.ZipFile(broken, "w") as archive:  # an .npz whose array cannot be read: core names its path
        archive.writestr("x.npy", b"\x93NUMPY garbage")
    broken.seek(0)
    config = {"architecture": "idap:digits", "target": {"macs_reduction": 0.5}}
    response = client.post("/v1/jobs", headers=auth(keys["a"]), data={"config": json.dumps(config)},
                           files={"model": (model.name, model.read_bytes()), "data": ("data.npz", broken)})
    error = _shape(response, 422)
    text = error["message"] + (error["hint"] or "")
    assert "data.npz is not a readable .npz file" in text, error
    assert str(settings.data_dir) not in text and "/uploads/" not in text and "upload-" not in text, error
    missing = submit(client, keys["a"], digits, {"target": {"macs_reduction": 0.5}, "method": {"ignored_layers":
                                                                                                    ["/etc/passwd"]}})
    assert "/etc/" not in missing.text


@pytest.mark.parametrize(("text", "expected"), [
    ("Could not read /home/u/.local/share/idap/uploads/upload-1a2b/data.npz: bad zip",
     "Could not read data.npz: bad zip"),
    ("No such file: '/tmp/job-1-x/model.safetensors'", "No such file: 'model.safetensors'"),
    ("[Errno 2] /data/artifacts/jobs/j/inputs/", "[Errno 2] …"),
])
def test_paths_are_cut_to_their_file_names(text: str, expected: str) -> None:
    assert without_paths(text) == expected


@pytest.mark.parametrize("text", ["POST the same files to /v1/inspect; see /docs or /ui/signin",
                                  "https://example.com/a/b/c.json and 1/2 of MACs/params"])
def test_routes_urls_and_fractions_are_not_paths(text: str) -> None:
    assert without_paths(text) == text


def test_the_sqlite_files_are_readable_by_their_owner_only(tmp_path: Path) -> None:
    local = Settings(data_dir=tmp_path / "data")
    upgrade(local.database)
    with TestClient(create_app(local), base_url="http://127.0.0.1:8000") as client:
        assert client.get("/readyz").status_code == 200
    get_engine(local.database).dispose()
    files = [path for path in (tmp_path / "data").iterdir() if path.name.startswith(("idap.db", "broker.db"))]
    assert {path.name for path in files} >= {"idap.db"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE((tmp_path / "data").stat().st_mode) == 0o700

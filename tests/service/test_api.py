"""The HTTP API without a worker: validation, errors, auth, tenancy, listing, cancel and delete."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from domain.settings import Settings
from domain.webhooks import WebhookUrlError, check_url
from tests.service.helpers import auth, submit

# Jobs on the GPU queue, which no test worker consumes, stay queued for as long as a test needs.
PARKED = {"device": "cuda"}


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] and error["message"]
    return error


def test_health_and_docs(client: Any, keys: dict[str, str]) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz", headers=auth(keys["a"]))
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"] == {"database": "ok", "broker": "ok"}
    assert client.get("/docs", headers=auth(keys["a"])).status_code == 200
    openapi = client.get("/openapi.json", headers=auth(keys["a"])).json()
    paths = openapi["paths"]
    assert {"/v1/jobs", "/v1/jobs/{job_id}/events", "/v1/inspect", "/v1/jobs/{job_id}/report"} <= set(paths)


def test_openapi_documents_the_typed_report(client: Any, keys: dict[str, str]) -> None:
    openapi = client.get("/openapi.json", headers=auth(keys["a"])).json()

    def returns(path: str, method: str) -> str:
        return openapi["paths"][path][method]["responses"]["200"]["content"]["application/json"]["schema"]["$ref"]

    assert returns("/v1/jobs/{job_id}/report", "get").endswith("/Report")
    assert returns("/v1/inspect", "post").endswith("/PreflightReport")
    schemas = openapi["components"]["schemas"]
    assert {"StepRecord", "LayerRow", "HeadRow", "RemovedBlock", "StopReason", "ReportHeadline"} <= set(schemas)
    assert schemas["StepRecord"]["properties"]["stage"]["$ref"].endswith("/Stage")
    metrics = schemas["JobOut"]["properties"]["metrics"]["anyOf"]
    assert any(option.get("$ref", "").endswith("/ReportHeadline") for option in metrics)


def test_the_app_uses_the_broker_its_settings_name(settings: Settings, keys: dict[str, str],
                                                   digits: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The environment names a working broker; only the Settings object passed in names one nobody listens on.
    A job submitted meanwhile is accepted and waits, queued (test_submission.py has it sent once the broker is back)."""
    unreachable = "redis://127.0.0.1:1/0"
    monkeypatch.setenv("IDAP_BROKER_URL", settings.broker)
    with TestClient(create_app(settings.model_copy(update={"broker_url": unreachable}))) as client:
        ready = client.get("/readyz", headers=auth(keys["a"]))
        assert ready.status_code == 503, ready.text
        checks = ready.json()["checks"]
        assert checks["database"] == "ok" and checks["broker"] != "ok", checks
        response = submit(client, keys["a"], digits, PARKED)
        assert response.status_code == 202, response.text
        assert response.json()["status"] == "queued"
        client.post(f"/v1/jobs/{response.json()['id']}/cancel", headers=auth(keys["a"]))


def test_keys_are_required_and_checked(client: Any) -> None:
    error = error_of(client.get("/v1/jobs"), 401)
    assert "idap keys create" in error["hint"]
    error_of(client.get("/v1/jobs", headers=auth("idap_not-a-key")), 401)


def test_bad_config_is_a_422_that_says_why(client: Any, keys: dict[str, str], digits: tuple[Path, Path]) -> None:
    error = error_of(submit(client, keys["a"], digits, {"target": {"macs_reduction": 1.5}}), 422)
    assert error["code"] == "invalid_config" and "macs_reduction" in error["message"]
    error = error_of(submit(client, keys["a"], digits, {"stages": ["filters", "nope"]}), 422)
    assert "stages" in error["message"]
    error = error_of(submit(client, keys["a"], digits, {"recovery": {"recovery_iterationz": 1}}), 422)
    assert "recovery_iterationz" in error["message"]
    error = error_of(submit(client, keys["a"], digits, {"method": {"group_scores": "max"}}), 422)
    assert "group_scores" in error["message"]
    error = error_of(client.post("/v1/jobs", headers=auth(keys["a"]), data={"config": "{not json"},
                                 files={"model": ("m.safetensors", b"x")}), 422)
    assert error["code"] == "invalid_config"


def test_method_options_reach_the_engine() -> None:
    from core.options import Allocation, GroupScores
    from domain.config import JobConfig, MethodIn

    assert MethodIn.model_fields["group_scores"].annotation is GroupScores
    assert MethodIn.model_fields["allocation"].annotation is Allocation

    config = JobConfig.model_validate({"target": {"macs_reduction": 0.5}, "method": {
        "layers_must_beat_width": False, "group_scores": "mean", "mean_compensation": False,
        "least_squares_compensation": False, "allocation": "scores"}})
    options = config.options_core()
    assert (options.layers_must_beat_width, options.group_scores, options.mean_compensation,
            options.least_squares_compensation, options.allocation) == (False, "mean", False, False, "scores")
    precise = JobConfig.model_validate({"target": {"macs_reduction": 0.5}, "recovery": {"precision": "fp32"}})
    assert precise.options_core().precision == "fp32"
    named = JobConfig.model_validate({"target": {"macs_reduction": 0.5}, "output": "aux"})
    assert named.options_core().output == "aux"
    defaults = JobConfig.model_validate({"target": {"macs_reduction": 0.5}}).options_core()
    assert (defaults.layers_must_beat_width, defaults.group_scores, defaults.mean_compensation,
            defaults.least_squares_compensation, defaults.allocation) == (True, "auto", True, True, "auto")
    assert defaults.precision == "auto"


def test_the_task_reaches_the_engine_and_an_unknown_one_is_a_422(client: Any, keys: dict[str, str],
                                                                   digits: tuple[Path, Path]) -> None:
    from api.schemas import InspectConfig
    from core.tasks.kinds import Task
    from domain.config import JobConfig

    assert JobConfig.model_fields["task"].annotation is Task
    assert JobConfig.model_validate({"target": {"macs_reduction": 0.5}}).options_core().task is Task.AUTO
    chosen = JobConfig.model_validate({"target": {"macs_reduction": 0.5}, "task": "causal-lm"})
    assert chosen.options_core().task is Task.CAUSAL_LM and chosen.target_core().max_accuracy_drop is None
    assert InspectConfig.model_validate({"task": "segmentation"}).options_core().task is Task.SEGMENTATION
    error = error_of(submit(client, keys["a"], digits, {"task": "regression"}), 422)
    assert error["code"] == "invalid_config" and "task" in error["message"]


def test_preflight_failures_are_422(client: Any, keys: dict[str, str], digits: tuple[Path, Path]) -> None:
    unreachable = {"target": {"macs_reduction": 0.99}, "stages": ["filters"]}
    error = error_of(submit(client, keys["a"], digits, unreachable), 422)
    assert "out of reach" in error["message"]
    error = error_of(submit(client, keys["a"], digits, {"architecture": "idap:no-such-net"}), 422)
    assert error["hint"]
    model, _ = digits
    error = error_of(client.post("/v1/jobs", headers=auth(keys["a"]), data={"config": json.dumps(
        {"target": {"macs_reduction": 0.3}, "architecture": "idap:digits"})},
        files={"model": ("model.safetensors", model.read_bytes())}), 422)
    assert error["code"] == "missing_file" and "data" in error["message"]


def test_uploads_are_limited_while_streaming(client: Any, keys: dict[str, str], digits: tuple[Path, Path]) -> None:
    big = b"\0" * (3 * 1024 * 1024)
    response = client.post("/v1/jobs", headers=auth(keys["a"]), data={"config": json.dumps({"target": {}})},
                           files={"model": ("model.onnx", big), "data": ("data.npz", b"x")})
    assert error_of(response, 413)["code"] == "file_too_large"
    assert error_of(client.post("/v1/jobs", headers=auth(keys["a"]), json={}), 415)["code"]


def test_inspect(client: Any, keys: dict[str, str], digits: tuple[Path, Path]) -> None:
    model, data = digits
    response = client.post("/v1/inspect", headers=auth(keys["a"]),
                           data={"config": json.dumps({"architecture": "idap:digits",
                                                       "target": {"macs_reduction": 0.5}})},
                           files={"model": (model.name, model.read_bytes()), "data": (data.name, data.read_bytes())})
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["macs"] > 0 and report["feasible"] is True and report["prunable_groups"]


def _digits_npz(digits: tuple[Path, Path], y: np.ndarray | None) -> bytes:
    """The digits' first 64 inputs with labels `y` (None: none)."""
    with np.load(digits[1]) as arrays:
        x = arrays["x"][:64]
    buffer = io.BytesIO()
    np.savez(buffer, x=x, **({} if y is None else {"y": y}))
    return buffer.getvalue()


def inspect_digits(client: Any, key: str, digits: tuple[Path, Path], config: dict[str, Any],
                   data: bytes | None = None) -> Any:
    model, npz = digits
    return client.post("/v1/inspect", headers=auth(key),
                       data={"config": json.dumps({"architecture": "idap:digits", **config})},
                       files={"model": (model.name, model.read_bytes()), "data": (npz.name, data or npz.read_bytes())})


def test_inspect_says_which_task_it_chose_with_its_metric_and_budget(client: Any, keys: dict[str, str],
                                                                      digits: tuple[Path, Path]) -> None:
    response = inspect_digits(client, keys["a"], digits, {})
    assert response.status_code == 200, response.text
    report = response.json()
    assert (report["task"], report["metric"], report["num_classes"]) == ("classification", "top1", 10)
    assert report["budget"] == "top-1 accuracy may drop by at most 1.00 points"
    assert report["task_reason"] == "its output is a score per class (N×classes)"
    assert any(note.startswith("Task: classification (inferred: its output is a score per class")
               for note in report["notes"]), report["notes"]
    response = inspect_digits(client, keys["a"], digits, {"task": "generic", "target": {
        "macs_reduction": 0.3, "max_accuracy_drop": 0.2}}, _digits_npz(digits, None))
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["task_reason"] is None  # named by the job
    assert (report["task"], report["metric"], report["num_classes"]) == ("generic", "relative_output_error", None)
    assert report["budget"] == "relative output error may rise by at most 20.00 points"


def test_a_task_that_does_not_fit_or_labels_in_the_wrong_layout_are_refused_before_anything_is_stored(
        client: Any, keys: dict[str, str], digits: tuple[Path, Path], settings: Settings) -> None:
    model, _ = digits
    jobs = settings.data_dir / "artifacts" / "jobs"
    stored = set(jobs.iterdir()) if jobs.exists() else set()
    def listed() -> list[str]:  # ids only: other tests' jobs may move on meanwhile
        return [job["id"] for job in client.get("/v1/jobs", headers=auth(keys["a"])).json()["jobs"]]

    before = listed()
    cases = [
        ({"task": "segmentation"}, None, "output_not_map", "per-pixel map"),
        ({"task": "causal-lm"}, None, "missing_input", "token ids"),
        ({}, _digits_npz(digits, np.linspace(0, 9, 64)), "labels_wrong_format", "one integer class id per sample"),
        ({"task": "embedding"}, _digits_npz(digits, np.arange(64)), "labels_wrong_format", "Every embedding label"),
        ({"task": "detection"}, _digits_npz(digits, np.zeros((64, 2, 5), "f4")), "output_not_detections",
         "not detections"),
    ]
    for config, data, code, fragment in cases:
        inspected = error_of(inspect_digits(client, keys["a"], digits, config, data), 422)
        submitted = error_of(client.post(
            "/v1/jobs", headers=auth(keys["a"]), data={"config": json.dumps({"architecture": "idap:digits", **config,
                                                                             "target": {"macs_reduction": 0.3}})},
            files={"model": (model.name, model.read_bytes()),
                   "data": ("data.npz", data or digits[1].read_bytes())}), 422)
        for error in (inspected, submitted):
            assert error["code"] == code and fragment in error["message"] and error["hint"], (config, error)
    assert listed() == before
    assert (set(jobs.iterdir()) if jobs.exists() else set()) == stored
    assert not list((settings.data_dir / "uploads").glob("upload-*"))  # the requests' scratch, gone with them


def test_webhook_urls_to_private_networks_are_refused() -> None:
    for url in ("http://127.0.0.1:9/x", "http://10.1.2.3/x", "http://169.254.169.254/latest", "http://[::1]/x",
                "ftp://example.com/x"):
        with pytest.raises(WebhookUrlError):
            check_url(url, allow_private=False)
    check_url("http://127.0.0.1:9/x", allow_private=True)


def test_submit_get_list_cancel_delete_and_tenancy(client: Any, keys: dict[str, str],
                                                   digits: tuple[Path, Path]) -> None:
    ids = []
    for _ in range(3):
        response = submit(client, keys["a"], digits, PARKED)
        assert response.status_code == 202, response.text
        assert response.headers["location"] == f"/v1/jobs/{response.json()['id']}"
        ids.append(response.json()["id"])
    job = client.get(f"/v1/jobs/{ids[0]}", headers=auth(keys["a"])).json()
    assert job["status"] == "queued" and job["attempts"] == 0 and job["artifacts"] == []
    assert job["progress"]["stage"] == "queued"

    # tenant b sees none of it
    assert error_of(client.get(f"/v1/jobs/{ids[0]}", headers=auth(keys["b"])), 404)["code"] == "not_found"
    error_of(client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth(keys["b"])), 404)
    error_of(client.delete(f"/v1/jobs/{ids[0]}", headers=auth(keys["b"])), 404)
    assert client.get("/v1/jobs", headers=auth(keys["b"])).json()["jobs"] == []

    page = client.get("/v1/jobs", params={"limit": 2, "status": "queued"}, headers=auth(keys["a"])).json()
    rest = client.get("/v1/jobs", params={"limit": 2, "status": "queued", "cursor": page["next_cursor"]},
                      headers=auth(keys["a"])).json()
    listed = [job["id"] for job in page["jobs"] + rest["jobs"]]
    assert listed[:3] == ids[::-1], "newest first"
    assert error_of(client.get("/v1/jobs", params={"cursor": "garbage"}, headers=auth(keys["a"])), 400)

    error_of(client.delete(f"/v1/jobs/{ids[0]}", headers=auth(keys["a"])), 409)
    cancelled = client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth(keys["a"]))
    assert cancelled.status_code == 202 and cancelled.json()["status"] == "cancelled"
    error_of(client.post(f"/v1/jobs/{ids[0]}/cancel", headers=auth(keys["a"])), 409)
    assert client.get("/v1/jobs", params={"status": "cancelled"}, headers=auth(keys["a"])).json()["jobs"][0]["id"] \
        == ids[0]
    assert client.delete(f"/v1/jobs/{ids[0]}", headers=auth(keys["a"])).status_code == 204
    error_of(client.get(f"/v1/jobs/{ids[0]}", headers=auth(keys["a"])), 404)
    for job_id in ids[1:]:
        client.post(f"/v1/jobs/{job_id}/cancel", headers=auth(keys["a"]))


def test_idempotency_key_returns_the_same_job(client: Any, keys: dict[str, str], digits: tuple[Path, Path]) -> None:
    config = PARKED | {"idempotency_key": "same-upload"}
    first = submit(client, keys["a"], digits, config)
    again = submit(client, keys["a"], digits, config)
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["id"] == again.json()["id"]
    other_tenant = submit(client, keys["b"], digits, config)
    assert other_tenant.status_code == 202 and other_tenant.json()["id"] != first.json()["id"]
    for key, response in (("a", first), ("b", other_tenant)):
        client.post(f"/v1/jobs/{response.json()['id']}/cancel", headers=auth(keys[key]))


def test_inspect_reads_text_data_with_the_config_s_column_names(client: Any, keys: dict[str, str],
                                                                 tmp_path: Path) -> None:
    from tests.intake_fixtures import write_bert_zip

    model = write_bert_zip(tmp_path)
    reviews = b"review,label\ngood film,1\nbad plot,0\ngreat acting,1\ndull story,0\n"

    def inspect(config: dict[str, Any]) -> Any:
        return client.post("/v1/inspect", headers=auth(keys["a"]), data={"config": json.dumps(config)},
                           files={"model": ("bert.zip", model.read_bytes()), "data": ("reviews.csv", reviews)})

    error = error_of(inspect({}), 422)
    assert error["code"] == "missing_text_column" and "found: label, review" in error["message"]
    response = inspect({"text_column": "review", "max_length": 8, "target": {"params_reduction": 0.3}})
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["input_format"] == "hf" and report["input_dtype"] == "int64" and report["samples"] == 4
    assert report["feasible"] is True


def _token_npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_named_inputs_are_reported_and_arrays_that_do_not_match_are_a_422(client: Any, keys: dict[str, str],
                                                                           tmp_path: Path) -> None:
    from tests.intake_fixtures import write_bert_zip

    model = write_bert_zip(tmp_path)
    ids = np.random.default_rng(0).integers(5, 20, size=(8, 10)).astype(np.int64)
    mask = np.ones_like(ids)
    config = {"target": {"params_reduction": 0.3}}

    def post(path: str, data: bytes) -> Any:
        return client.post(path, headers=auth(keys["a"]), data={"config": json.dumps(config)},
                           files={"model": ("bert.zip", model.read_bytes()), "data": ("tokens.npz", data)})

    response = post("/v1/inspect", _token_npz(input_ids=ids, attention_mask=mask, y=np.arange(8) % 2))
    assert response.status_code == 200, response.text
    assert response.json()["inputs"] == [{"name": "input_ids", "dtype": "int64", "shape": [10]},
                                         {"name": "attention_mask", "dtype": "int64", "shape": [10]}]
    bad = {
        "missing_input": _token_npz(attention_mask=mask),
        "unexpected_input": _token_npz(input_ids=ids, pixel_values=mask),
        "inputs_length_mismatch": _token_npz(input_ids=ids, attention_mask=mask[:6]),
        "float_token_ids": _token_npz(input_ids=ids.astype(np.float32)),
    }
    for code, data in bad.items():
        for path in ("/v1/inspect", "/v1/jobs"):
            error = error_of(post(path, data), 422)
            assert error["code"] == code and error["hint"], (path, error)

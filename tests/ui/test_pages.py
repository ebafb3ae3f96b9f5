"""Pages and their credentials in-process (SQLite, no worker): the sign-in cookie, the cross-site
checks on state changes, loopback mode without a key, the jobs list's pages and filter, another
tenant's job, and a failed job's message and hint."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from html import unescape
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from core.tasks.kinds import Metric, Task
from domain.db import upgrade
from domain.settings import Settings
from tests.report_fixtures import sample_report
from tests.ui.helpers import FAILURE, add_job, add_report, tenant_with_key

SAME = {"Origin": "http://testserver"}
EVIL = {"Origin": "https://evil.example"}


def make_settings(data_dir: Path, require_auth: bool) -> Settings:
    # Every location given explicitly: the service tests' IDAP_* variables may be set in this process.
    settings = Settings(data_dir=data_dir, database_url=f"sqlite:///{data_dir / 'idap.db'}",
                        storage_url=str(data_dir / "artifacts"), broker_url="memory://", s3_endpoint_url=None,
                        public_url=None, host="127.0.0.1", require_auth=require_auth)
    upgrade(settings.database)
    return settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path, require_auth=True)


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), follow_redirects=False) as test_client:
        yield test_client


def rows(html: str) -> list[str]:
    return re.findall(r'<tr id="job-([0-9a-f]+)"', html)


def test_sign_in_sets_a_strict_http_only_cookie_that_pages_and_the_api_accept(client: TestClient,
                                                                              settings: Settings) -> None:
    _, key = tenant_with_key(settings.database, "ui-alice")
    assert client.get("/").headers["location"] == "/ui/jobs"
    response = client.get("/ui/jobs")
    assert response.status_code == 303 and response.headers["location"] == "/ui/signin?next=/ui/jobs"
    assert client.get("/v1/jobs").status_code == 401

    page = client.get("/ui/signin")
    assert page.status_code == 200 and 'type="password"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    wrong = client.post("/ui/signin", data={"key": "idap_wrong"}, headers=SAME)
    assert wrong.status_code == 401 and "not valid" in wrong.text and "set-cookie" not in wrong.headers
    # a sign-in form posted from elsewhere (login CSRF), or with no origin at all, is refused
    assert client.post("/ui/signin", data={"key": key}, headers=EVIL).status_code == 403
    assert client.post("/ui/signin", data={"key": key}).status_code == 403

    signed_in = client.post("/ui/signin", data={"key": key, "next": "https://evil.example/"}, headers=SAME)
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/ui/jobs"
    cookie = signed_in.headers["set-cookie"]
    assert cookie.startswith(f"idap_key={key};") and "HttpOnly" in cookie and "SameSite=strict" in cookie
    assert "Secure" not in cookie  # plain http here; see the https test
    assert "ui-alice" in client.get("/ui/jobs").text
    assert client.get("/v1/jobs").status_code == 200

    # state changes with the cookie must come from this origin; a Bearer key needs no origin
    missing = "/v1/jobs/" + "0" * 32 + "/cancel"
    refused = client.post(missing)
    assert refused.status_code == 403 and refused.json()["error"]["code"] == "cross_site_request"
    assert client.post(missing, headers=EVIL).status_code == 403
    assert client.post(missing, headers=SAME).status_code == 404
    assert client.post(missing, headers={"Referer": "http://testserver/ui/jobs/x"}).status_code == 404
    client.cookies.clear()
    assert client.post(missing, headers={"Authorization": f"Bearer {key}"}).status_code == 404

    assert client.post("/ui/signin", data={"key": key}, headers=SAME).status_code == 303
    assert client.post("/ui/signout", headers=EVIL).status_code == 403
    signed_out = client.post("/ui/signout", headers=SAME)
    assert signed_out.status_code == 303 and 'idap_key=""' in signed_out.headers["set-cookie"]
    assert client.get("/ui/jobs").status_code == 303


def test_a_revoked_key_in_the_cookie_sends_the_browser_to_sign_in(client: TestClient) -> None:
    client.cookies.set("idap_key", "idap_revoked")
    response = client.get("/ui/jobs/new")
    assert response.status_code == 303 and response.headers["location"] == "/ui/signin?next=/ui/jobs/new"
    assert 'idap_key=""' in response.headers["set-cookie"]
    api = client.get("/v1/jobs")
    assert api.status_code == 401 and "Sign in again" in api.json()["error"]["hint"]


def test_the_cookie_is_secure_over_https(settings: Settings) -> None:
    _, key = tenant_with_key(settings.database, "ui-https")
    with TestClient(create_app(settings), base_url="https://testserver", follow_redirects=False) as client:
        response = client.post("/ui/signin", data={"key": key}, headers={"Origin": "https://testserver"})
    assert response.status_code == 303 and "Secure" in response.headers["set-cookie"]


def test_loopback_mode_needs_no_sign_in_but_still_refuses_cross_site_posts(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path, require_auth=False))
    with TestClient(app, base_url="http://127.0.0.1:8000", follow_redirects=False) as client:
        # a DNS name rebound to 127.0.0.1 reaches the server, but not a keyless one
        assert client.get("/ui/jobs", headers={"host": "attacker.example"}).status_code == 400
        assert client.get("/v1/jobs", headers={"host": "attacker.example:8000"}).status_code == 400
        page = client.get("/ui/jobs")
        assert page.status_code == 200 and "Local mode" in page.text and "Sign in with a key" in page.text
        assert client.get("/ui/jobs/new").status_code == 200
        assert "no key is needed" in client.get("/ui/signin").text
        missing = "/v1/jobs/" + "0" * 32 + "/cancel"
        assert client.post(missing, headers=EVIL).status_code == 403
        assert client.post(missing).status_code == 404  # curl sends no Origin


def test_jobs_list_pages_filters_and_keeps_tenants_apart(client: TestClient, settings: Settings) -> None:
    alice, key = tenant_with_key(settings.database, "ui-alice")
    bob, _ = tenant_with_key(settings.database, "ui-bob")
    ids = [add_job(settings.database, alice, "failed" if i % 5 == 0 else "queued", age_s=100 - i, error=FAILURE)
           for i in range(23)]
    other = add_job(settings.database, bob, "failed", error=FAILURE)
    client.cookies.set("idap_key", key)

    first = client.get("/ui/jobs").text
    assert rows(first) == ids[::-1][:20]
    older = re.search(r'href="(/ui/jobs\?cursor=[^"]+)" rel="next"', first)
    assert older and "Newest" not in first
    second = client.get(older.group(1).replace("&amp;", "&")).text
    assert rows(second) == ids[::-1][20:] and 'rel="next"' not in second and "Newest" in second

    failed = client.get("/ui/jobs", params={"status": "failed"}).text
    assert rows(failed) == [job for job in ids[::-1] if ids.index(job) % 5 == 0]
    assert 'value="failed" selected' in failed
    assert rows(client.get("/ui/jobs", params={"status": "bogus"}).text) == ids[::-1][:20]
    assert client.get("/ui/jobs", params={"cursor": "not-a-cursor"}).status_code == 400

    assert other not in first
    hidden = client.get(f"/ui/jobs/{other}")
    assert hidden.status_code == 404 and "Not found" in hidden.text and "other tenants" in hidden.text


def test_a_failed_job_shows_its_message_and_what_to_change(client: TestClient, settings: Settings) -> None:
    alice, key = tenant_with_key(settings.database, "ui-alice")
    job_id = add_job(settings.database, alice, "failed", error=FAILURE)
    client.cookies.set("idap_key", key)
    page = client.get(f"/ui/jobs/{job_id}")
    assert page.status_code == 200
    assert "The job failed" in page.text and FAILURE["message"] in page.text
    assert "What to change:" in page.text and FAILURE["hint"] in page.text
    assert 'id="cancel"' not in page.text and 'data-terminal="true"' in page.text


def test_a_succeeded_job_without_a_report_still_has_its_page(client: TestClient, settings: Settings) -> None:
    alice, key = tenant_with_key(settings.database, "ui-alice")
    job_id = add_job(settings.database, alice, "succeeded")
    client.cookies.set("idap_key", key)
    page = client.get(f"/ui/jobs/{job_id}")
    assert page.status_code == 200 and "no report.json" in page.text and "<svg" not in page.text


def test_the_steps_table_says_whether_each_recovery_was_kept(client: TestClient, settings: Settings,
                                                            tmp_path: Path) -> None:
    alice, key = tenant_with_key(settings.database, "ui-alice")
    job_id = add_job(settings.database, alice, "succeeded")
    add_report(settings, job_id, sample_report(), tmp_path)
    client.cookies.set("idap_key", key)
    page = client.get(f"/ui/jobs/{job_id}").text
    table = re.search(r"The steps as a table.*?<tbody>(.*?)</tbody>", page, re.S).group(1)  # type: ignore[union-attr]
    rows = re.findall(r"<tr>(.*?)</tr>", table, re.S)
    assert [re.findall(r"<td>([^<]*)</td>", row)[-1] for row in rows] == ["kept", "undone: it did harm", "–"]


@pytest.mark.parametrize(("changes", "label", "before", "after", "change", "budget"), [
    ({}, "top-1 accuracy", "99.00%", "98.00%", "−1.00 pt", "top-1 accuracy may drop by at most 1.00 points"),
    ({"task": Task.CAUSAL_LM, "accuracy_metric": Metric.PERPLEXITY, "accuracy_before": 12.0, "accuracy_after": 13.1,
      "budget": Metric.PERPLEXITY.describe_budget(0.1)},
     "perplexity", "12.000", "13.100", "+9.2%", "perplexity may rise by at most 10.0% of the original's"),
    ({"task": Task.SEGMENTATION, "accuracy_metric": Metric.MIOU, "accuracy_before": 0.625, "accuracy_after": 0.6,
      "budget": Metric.MIOU.describe_budget(0.02)}, "mIoU", "62.50%", "60.00%", "−2.50 pt",
     "mIoU may drop by at most 2.00 points"),
], ids=["classification", "causal-lm", "segmentation"])
def test_a_succeeded_job_shows_its_task_and_metric_formatted_by_the_metric(
        client: TestClient, settings: Settings, tmp_path: Path, changes: dict, label: str, before: str, after: str,
        change: str, budget: str) -> None:
    alice, key = tenant_with_key(settings.database, "ui-alice")
    job_id = add_job(settings.database, alice, "succeeded")
    report = sample_report(**({"budget": Metric.TOP1.describe_budget(0.01)} | changes))
    add_report(settings, job_id, report, tmp_path)
    client.cookies.set("idap_key", key)
    page = client.get(f"/ui/jobs/{job_id}").text
    assert re.search(r'id="task">([^<]*)<', page).group(1) == report.task  # type: ignore[union-attr]
    quality = re.search(r'id="quality">(.*?)</p>', page, re.S).group(1)  # type: ignore[union-attr]
    quality = unescape(re.sub(r"\s+", " ", quality))
    assert quality == f"Task {report.task}: quality is {label}; {budget}."
    row = re.search(rf'<th scope="row">{re.escape(label)}</th>(.*?)</tr>', page, re.S)
    assert row, page
    assert re.findall(r'<td class="num">([^<]*)</td>', row.group(1)) == [before, after, change]
    assert f'<th scope="col" class="num">{label}</th>' in page  # the steps' table names the metric too
    listing = client.get("/ui/jobs").text
    assert f'<span class="task">{report.task}</span>' in listing
    assert re.search(rf'data-label="Quality" class="num">{re.escape(change)} <span class="sub">{re.escape(label)}'
                     "</span>", listing), listing


def test_the_new_job_form_offers_every_task_with_its_default_budget(client: TestClient, settings: Settings) -> None:
    _, key = tenant_with_key(settings.database, "ui-alice")
    client.cookies.set("idap_key", key)
    form = client.get("/ui/jobs/new").text
    assert re.findall(r'<option value="([^"]+)">', form.split('id="task"')[1].split("</select>")[0]) == list(Task)
    assert 'id="drop" name="drop" type="number"' in form and 'value="1"' not in form.split('id="drop"')[1][:120]
    defaults = re.findall(r"<li><strong>([^<]+)</strong>: ([^<]+)</li>", unescape(form))
    assert ("classification", "top-1 accuracy may drop by at most 1.00 points") in defaults
    assert ("causal-lm", "perplexity may rise by at most 10.0% of the original's") in defaults
    assert [task for task, _ in defaults] == [task for task in Task if task is not Task.AUTO]


def test_a_running_job_shows_its_elapsed_time_and_eta(client: TestClient, settings: Settings) -> None:
    from sqlalchemy import update

    from domain.db import session_scope
    from domain.models import Job

    alice, key = tenant_with_key(settings.database, "ui-alice")
    job_id = add_job(settings.database, alice, "running")
    with session_scope(settings.database) as session:
        session.execute(update(Job).where(Job.id == job_id).values(progress={
            "stage": "filters", "step": 2, "total_steps": 28, "fraction": 0.4, "message": "filters step 2",
            "elapsed_s": 61.2, "eta_s": 125.0}))
    client.cookies.set("idap_key", key)
    page = client.get(f"/ui/jobs/{job_id}")
    assert page.status_code == 200
    assert re.search(r'id="eta"[^>]*>61 s elapsed · about 125 s to go<', page.text), page.text
    job = client.get(f"/v1/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}).json()
    assert (job["progress"]["elapsed_s"], job["progress"]["eta_s"]) == (61.2, 125.0)


@pytest.mark.parametrize(("status", "shown"), [("queued", "waiting for attempt 1 of 1"), ("running", "attempt 1 of 1"),
                                               ("failed", "attempt 1 of 1"), ("cancelled", "never started")])
def test_the_job_page_counts_attempts_from_one(client: TestClient, settings: Settings, status: str,
                                               shown: str) -> None:
    alice, key = tenant_with_key(settings.database, "ui-alice")
    job_id = add_job(settings.database, alice, status, error=FAILURE)
    client.cookies.set("idap_key", key)
    page = client.get(f"/ui/jobs/{job_id}").text
    assert re.search(r'id="attempt">([^<]*)<', page).group(1) == shown  # type: ignore[union-attr]
    assert "attempt 0" not in page


def test_jobs_are_listed_and_titled_by_name_else_by_their_model_file(client: TestClient, settings: Settings) -> None:
    alice, key = tenant_with_key(settings.database, "ui-alice")
    named = add_job(settings.database, alice, name="resnet <half> MACs", model_filename="resnet18.safetensors")
    unnamed = add_job(settings.database, alice, model_filename="mobilenet.onnx")
    client.cookies.set("idap_key", key)
    listing = client.get("/ui/jobs").text
    assert f'<a href="/ui/jobs/{named}">resnet &lt;half&gt; MACs</a>' in listing
    assert f'<a href="/ui/jobs/{unnamed}">mobilenet.onnx</a>' in listing
    page = client.get(f"/ui/jobs/{named}").text
    assert '<span class="job-name">resnet &lt;half&gt; MACs</span>' in page
    assert "<title>resnet &lt;half&gt; MACs · IDAP++ Compress</title>" in page
    api = client.get(f"/v1/jobs/{unnamed}", headers={"Authorization": f"Bearer {key}"}).json()
    assert api["name"] == "mobilenet.onnx"
    assert 'id="job-name" name="name" maxlength="200"' in client.get("/ui/jobs/new").text


def test_a_job_name_longer_than_the_bound_is_refused(client: TestClient, settings: Settings) -> None:
    _, key = tenant_with_key(settings.database, "ui-alice")
    config = {"name": "x" * 201, "target": {"macs_reduction": 0.5}}
    response = client.post("/v1/jobs", headers={"Authorization": f"Bearer {key}"},
                           data={"config": json.dumps(config)},
                           files={"model": ("m.onnx", b"not a model"), "data": ("d.npz", b"not data")})
    assert response.status_code == 422, response.text
    assert "name" in response.json()["error"]["message"]

"""The UI in a real browser (Chromium through Playwright) against `idap serve` with its worker:
sign in, upload the digits model, read the preflight, submit, watch the progress, reach
"succeeded", see the charts, download model.onnx and run it; a bad upload's error inline; the
jobs list updating live (a new job appears, no polling while hidden) and a cancel; a failed job;
another tenant's job as a 404 page.

Screenshots of the main pages go to tests/artifacts/ for a person to look at."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import onnxruntime as ort
import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from domain import states
from domain.db import session_scope
from domain.states import JobStatus
from tests.service.helpers import free_port, wait_ready
from tests.ui.helpers import FAILURE, add_job, tenant_with_key

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
LAPTOP, PHONE = {"width": 1280, "height": 900}, {"width": 390, "height": 844}
# Records every value the job page's progress bar takes, across the reload that shows the results.
RECORD_PROGRESS = """
document.addEventListener("DOMContentLoaded", () => {
  const bar = document.getElementById("progress");
  if (!bar) return;
  new MutationObserver(() => {
    const seen = JSON.parse(sessionStorage.getItem("progress") || "[]");
    seen.push(bar.value);
    sessionStorage.setItem("progress", JSON.stringify(seen));
  }).observe(bar, { attributes: true, attributeFilter: ["value"] });
});
"""


@dataclass
class Server:
    url: str
    database: str


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """`idap serve` (SQLite, its own worker) with keys required, isolated from the service tests' settings."""
    data = tmp_path_factory.mktemp("ui-serve")
    port = free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("IDAP_")} | {
        "OMP_NUM_THREADS": "1", "IDAP_REQUIRE_AUTH": "true", "IDAP_PROGRESS_INTERVAL_S": "0.2",
        "IDAP_HEARTBEAT_INTERVAL_S": "0.5"}
    log = data / "serve.log"
    process = subprocess.Popen([sys.executable, "-m", "core", "serve", "--port", str(port), "--data-dir",
                                str(data / "data")], cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(process, url, log)
        yield Server(url, f"sqlite:///{data / 'data' / 'idap.db'}")
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail("The UI tests drive Debian's Chromium at /usr/bin/chromium: apt-get install -y chromium")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield launched
        launched.close()


def open_page(browser: Browser, problems: list[str]) -> Page:
    page = browser.new_context(viewport=LAPTOP, accept_downloads=True).new_page()
    page.on("pageerror", lambda error: problems.append(f"script error: {error}"))
    page.on("console", lambda message: problems.append(message.text) if "Content Security Policy" in message.text
            else None)
    page.set_default_timeout(30_000)
    # the preflight measures a real pruning step on the server: seconds when the machine is busy
    expect.set_options(timeout=30_000)
    return page


def shot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=ARTIFACTS / f"{name}.png", full_page=True)


def shot_laptop_and_phone(page: Page, name: str) -> None:
    """Screenshots at laptop and phone width; on the phone nothing may scroll sideways."""
    shot(page, name)
    page.set_viewport_size(PHONE)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth"), f"{name} overflows a phone"
    shot(page, f"{name}-phone")
    page.set_viewport_size(LAPTOP)


def test_browser_scenario(server: Server, browser: Browser, digits_files: tuple[Path, Path]) -> None:
    alice_id, alice_key = tenant_with_key(server.database, "alice")
    _, bob_key = tenant_with_key(server.database, "bob")
    model, data = digits_files[0].with_suffix(".safetensors"), digits_files[1]
    problems: list[str] = []
    page = open_page(browser, problems)
    page.add_init_script(RECORD_PROGRESS)

    sign_in(page, server, alice_key)
    job_url = submit_digits_job(page, model, data)
    watch_it_succeed(page)
    check_results(page, data)
    bad_upload_shows_its_error(page, data)
    live_list_and_cancel(page, server, alice_key, model, data)
    attempt_counter_follows_the_claim(page, server, alice_id)
    failed_job(page, server, alice_id)
    other_tenant_gets_a_404(browser, server, bob_key, job_url, problems)
    assert not problems, problems


def sign_in(page: Page, server: Server, key: str) -> None:
    page.goto(f"{server.url}/ui/jobs")
    expect(page).to_have_url(f"{server.url}/ui/signin?next=/ui/jobs")
    page.fill("#key", "idap_not-a-key")
    page.press("#key", "Enter")
    expect(page.locator("#signin-error")).to_contain_text("not valid")
    shot(page, "signin")
    # by keyboard: the field, then Tab to the button
    page.fill("#key", key)
    page.focus("#key")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent.trim()") == "Sign in"
    page.keyboard.press("Enter")
    expect(page).to_have_url(f"{server.url}/ui/jobs")
    expect(page.locator(".who")).to_contain_text("alice")
    cookie = next(c for c in page.context.cookies() if c["name"] == "idap_key")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == "", "scripts must not see the key"


def submit_digits_job(page: Page, model: Path, data: Path) -> str:
    page.click("text=New job >> nth=0")
    # the empty field's example reads as an example (italic, "e.g."), not as a value already filled in
    assert (page.get_attribute("#architecture", "placeholder") or "").startswith("e.g. ")
    assert page.eval_on_selector("#architecture", "el => getComputedStyle(el, '::placeholder').fontStyle") == "italic"
    page.fill("#architecture", "idap:digits")
    page.set_input_files("#model", model)
    page.set_input_files("#data", data)
    expect(page.locator("#preflight-result")).to_be_visible()
    expect(page.locator("#pf-macs")).to_have_text("4.51M")
    expect(page.locator("#pf-feasible")).to_have_text("feasible")
    assert page.inner_text("#pf-groups") == "6" and page.inner_text("#pf-not-count") == "1"
    assert page.inner_text("#pf-outputs") == "logits 10"
    assert "on a GPU" in page.inner_text("#pf-estimate")
    # every input by name, per-sample shape and dtype (the digits model takes one, x)
    assert page.inner_text("#pf-input").startswith("x 1×8×8 float32, 10 classes")
    # auto says which task it chose and why; the empty budget field stands for that task's default
    expect(page.locator("#pf-task")).to_contain_text("classification (inferred: its output is a score per class")
    expect(page.locator("#pf-budget")).to_have_text("top-1 accuracy may drop by at most 1.00 points")
    assert page.input_value("#task") == "auto" and page.input_value("#drop") == ""
    expect(page.locator("#budget-defaults")).to_contain_text("causal-lm: perplexity may rise by at most 10.0%")
    page.focus("#macs")  # the slider by keyboard: 50 % down to 30 %
    for _ in range(4):
        page.keyboard.press("ArrowLeft")
    expect(page.locator("#macs-out")).to_have_text("30 %")
    page.select_option("#recovery-unit", "iterations")
    page.fill("#recovery", "1")
    page.fill("#final-recovery", "1")
    page.select_option("#device", "cpu")
    page.fill("#job-name", "digits, 30 % fewer MACs")
    page.locator("details").first.evaluate("el => el.open = true")
    expect(page.locator("#pf-not")).to_contain_text("output layer")
    expect(page.locator("#preflight")).to_have_attribute("aria-busy", "false")  # the re-check for 30 % is done
    expect(page.locator("#preflight-status")).to_contain_text("Checked model.safetensors")
    shot_laptop_and_phone(page, "new-job-preflight")
    page.click("#submit")
    # the server runs the preflight again before it queues the job: slow on a busy machine
    deadline = time.monotonic() + 90
    while page.url.endswith("/new"):
        assert page.locator("#submit-error").is_hidden(), page.inner_text("#submit-error")
        assert time.monotonic() < deadline, "the job page did not open"
        page.wait_for_timeout(200)
    page.wait_for_load_state()
    expect(page.locator("h1 .job-name")).to_have_text("digits, 30 % fewer MACs")
    return page.url


def watch_it_succeed(page: Page) -> None:
    expect(page.locator("#job-status .badge")).to_have_text("succeeded", timeout=90_000)
    expect(page.locator("#chart-trajectory")).to_be_visible()  # after the reload that renders the results
    seen = json.loads(page.evaluate("sessionStorage.getItem('progress') || '[]'"))
    assert any(0 < value < 1 for value in seen) and len(set(seen)) >= 3, f"progress never advanced: {seen}"


def check_results(page: Page, data: Path) -> None:
    table = page.locator("table.compare")
    for row in ("MACs", "Params", "top-1 accuracy", "ORT latency, batch 1", "ONNX file"):
        expect(table).to_contain_text(row)
    expect(page.locator("#task")).to_have_text("classification")
    expect(page.locator("#quality")).to_have_text(
        "Task classification: quality is top-1 accuracy; top-1 accuracy may drop by at most 1.00 points.")
    expect(page.locator("#chart-trajectory figcaption")).to_have_text("Top-1 accuracy against MACs, step by step")
    expect(page.locator("#chart-trajectory svg")).to_contain_text("↑ top-1 accuracy")
    for key in ("channels", "divergence", "trajectory", "blocks"):
        svg = page.locator(f"#chart-{key} svg")
        # Stage 2 tries a block only when one fits in what Stage 1 left of the target (tests/ui/test_charts.py
        # covers both of the blocks chart's forms)
        if key != "blocks" or "Stage 2 tried no residual blocks." not in (svg.text_content() or ""):
            assert svg.locator("rect, circle, text").count() > 3, key
        assert svg.bounding_box()["height"] > 30, key
    assert page.locator("#chart-trajectory circle").count() >= 3
    page.click("#chart-trajectory summary")
    expect(page.locator("#chart-trajectory table")).to_contain_text("filters")
    page.set_viewport_size(PHONE)
    # on a phone a chart is wider than its box: the box scrolls, and its edge shadows say so
    box = page.locator("#chart-divergence .chart-scroll")
    assert box.evaluate("el => el.scrollWidth > el.clientWidth")
    assert box.evaluate("el => getComputedStyle(el).backgroundImage").count("radial-gradient") == 2
    page.set_viewport_size(LAPTOP)
    shot_laptop_and_phone(page, "job-done")

    with page.expect_download() as download:
        page.click("a[download='model.onnx']")
    path = download.value.path()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with np.load(data) as arrays:
        x = arrays["x"][:4].astype(np.float32)
    assert session.run(None, {session.get_inputs()[0].name: x})[0].shape == (4, 10)


def bad_upload_shows_its_error(page: Page, data: Path) -> None:
    page.click("nav >> text=New job")
    page.fill("#architecture", "idap:digits")
    # dropped on the box, as a user drags a file from the desktop
    dropped = page.evaluate_handle("""() => {
      const transfer = new DataTransfer();
      const bytes = crypto.getRandomValues(new Uint8Array(4096));
      // the format is read from the first bytes: random ones start like a pickle or an ONNX file 1 time in 128
      bytes.set(new TextEncoder().encode("not a model file"));
      transfer.items.add(new File([bytes], "model.safetensors"));
      return transfer;
    }""")
    page.dispatch_event(".drop[data-for=model]", "drop", {"dataTransfer": dropped})
    assert page.evaluate("document.getElementById('model').files[0].name") == "model.safetensors"
    error = page.locator("#preflight-error")
    expect(error).to_contain_text("is not a model file this service reads")
    expect(error.locator(".hint")).to_contain_text("Upload an ONNX file")
    page.set_input_files("#data", data)
    page.click("#submit")
    expect(page.locator("#submit-error")).to_contain_text("is not a model file this service reads")
    shot(page, "new-job-bad-model")


def live_list_and_cancel(page: Page, server: Server, key: str, model: Path, data: Path) -> None:
    """A long job submitted while the list is open: its row appears and turns to running without a
    reload, the list stops asking while the tab is hidden, and the job's page cancels it."""
    page.goto(f"{server.url}/ui/jobs")
    page.evaluate("window.sameDocument = true")  # gone if the page reloads
    config = {"architecture": "idap:digits", "device": "cpu", "target": {"macs_reduction": 0.3},
              "recovery": {"recovery_iterations": 5000, "final_recovery_iterations": 5000}}
    response = httpx.post(f"{server.url}/v1/jobs", headers={"Authorization": f"Bearer {key}"},
                          data={"config": json.dumps(config)},
                          files={"model": (model.name, model.read_bytes()), "data": (data.name, data.read_bytes())})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    row = page.locator(f"#job-{job_id}")
    expect(row).to_have_attribute("data-status", "running", timeout=30_000)
    expect(row.locator(".badge")).to_have_text("running")
    assert page.evaluate("window.sameDocument") is True
    list_pauses_while_hidden(page)
    expect(page.locator("tr[data-status=succeeded] td[data-label=MACs]")).to_contain_text("%")
    page.set_viewport_size(PHONE)
    # on a phone each card still shows its job's id and time: jobs of one architecture stay apart
    expect(row.locator("td[data-label=Job] .sub")).to_be_visible()
    expect(row.locator("td[data-label=Job] .sub")).to_contain_text(job_id[:8])
    page.set_viewport_size(LAPTOP)
    shot_laptop_and_phone(page, "jobs")

    row.locator("a").click()
    expect(page.locator("#log li").first).to_be_visible()
    page.set_viewport_size(PHONE)
    # on a phone the heading wraps: the button goes below the title and its line of facts, not onto them
    for header in ("h1", ".job-heading p.sub"):
        assert_apart(page, "#cancel", header)
    shot(page, "job-running-phone")
    page.set_viewport_size(LAPTOP)
    shot(page, "job-running")
    page.click("#cancel")
    expect(page.locator("#job-status .badge")).to_have_text("cancelled", timeout=30_000)
    expect(page.locator("h2", has_text="Cancelled")).to_be_visible()


def list_pauses_while_hidden(page: Page) -> None:
    page.evaluate("""() => {
      window.fetches = 0;
      const original = window.fetch;
      window.fetch = (...args) => { window.fetches += 1; return original(...args); };
      Object.defineProperty(document, "hidden", { configurable: true, get: () => window.tabHidden });
      window.tabHidden = true;
      document.dispatchEvent(new Event("visibilitychange"));
    }""")
    page.wait_for_timeout(5000)  # more than two refresh intervals
    assert page.evaluate("window.fetches") == 0, "the list kept polling while hidden"
    page.evaluate("window.tabHidden = false; document.dispatchEvent(new Event('visibilitychange'))")
    page.wait_for_function("window.fetches > 0", timeout=5000)


def assert_apart(page: Page, first: str, second: str) -> None:
    a, b = page.locator(first).bounding_box(), page.locator(second).bounding_box()
    assert a and b, (first, second)
    overlap_x = a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"]
    overlap_y = a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"]
    assert not (overlap_x and overlap_y), f"{first} {a} overlaps {second} {b}"


def attempt_counter_follows_the_claim(page: Page, server: Server, tenant_id: str) -> None:
    """A page opened while the job waits says which attempt comes; once a worker claims it, which one runs."""
    job_id = add_job(server.database, tenant_id, "queued")  # its queue has no worker: the test claims it
    page.goto(f"{server.url}/ui/jobs/{job_id}")
    expect(page.locator("#attempt")).to_have_text("waiting for attempt 1 of 1")
    with session_scope(server.database) as session:
        assert states.transition(session, job_id, JobStatus.RUNNING, attempts=1)
    expect(page.locator("#job-status .badge")).to_have_text("running")
    expect(page.locator("#attempt")).to_have_text("attempt 1 of 1")
    with session_scope(server.database) as session:
        assert states.transition(session, job_id, JobStatus.CANCELLED)


def failed_job(page: Page, server: Server, tenant_id: str) -> None:
    job_id = add_job(server.database, tenant_id, "failed", error=FAILURE)
    page.goto(f"{server.url}/ui/jobs?status=failed")
    expect(page.locator("tbody tr")).to_have_count(1)
    page.locator(f"#job-{job_id} a").click()
    failure = page.locator(".failure")
    expect(failure).to_contain_text(FAILURE["message"])
    expect(failure).to_contain_text("What to change: " + FAILURE["hint"])
    shot(page, "job-failed")


def other_tenant_gets_a_404(browser: Browser, server: Server, key: str, job_url: str, problems: list[str]) -> None:
    page = open_page(browser, problems)
    page.goto(f"{server.url}/ui/signin")
    page.fill("#key", key)
    page.click("button[type=submit] >> text=Sign in")
    expect(page.locator(".who")).to_contain_text("bob")
    assert page.goto(job_url).status == 404
    expect(page.locator("h1")).to_have_text("Not found")
    api = page.request.get(job_url.replace("/ui/", "/v1/"))
    assert api.status == 404
    page.context.close()

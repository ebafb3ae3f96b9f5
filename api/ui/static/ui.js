// The UI's only script: live job updates, the new-job form with its preflight, and cancel.
// It talks to the /v1 REST endpoints; the sign-in cookie authenticates it (same origin only).
"use strict";

const TERMINAL = ["succeeded", "failed", "cancelled"];

function $(id) { return document.getElementById(id); }

// An API error body is {"error": {"code", "message", "hint"}}; anything else (a proxy's HTML page) says its status.
function apiError(status, text) {
  let body = null;
  try { body = JSON.parse(text); } catch (_) { /* not JSON */ }
  if (body && body.error) return body.error;
  return { code: "http_" + status, message: "The server answered " + status + ".", hint: "Try again." };
}

function showError(box, error) {
  box.replaceChildren();
  const message = document.createElement("p");
  message.textContent = error.message;
  box.append(message);
  if (error.hint) {
    const hint = document.createElement("p");
    hint.className = "hint";
    hint.textContent = error.hint;
    box.append(hint);
  }
  box.hidden = false;
}

function badge(status) {
  const span = document.createElement("span");
  span.className = "badge badge-" + status;
  span.textContent = status;
  return span;
}

// POST a FormData with upload progress (fetch cannot report it); resolves to {status, text}.
function upload(url, form, progress, onUploaded) {
  const xhr = new XMLHttpRequest();
  const done = new Promise((resolve, reject) => {
    xhr.open("POST", url);
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) progress.value = event.loaded / event.total;
    });
    xhr.upload.addEventListener("load", () => { progress.value = 1; onUploaded(); });
    xhr.addEventListener("load", () => resolve({ status: xhr.status, text: xhr.responseText }));
    xhr.addEventListener("error", () => reject(new Error("The connection to the server failed.")));
    xhr.addEventListener("abort", () => reject(new DOMException("aborted", "AbortError")));
    progress.value = 0;
    progress.hidden = false;
    xhr.send(form);
  });
  return { xhr, done };
}

// ---- jobs list: while the page is visible, fetch the server's rendering of it every few seconds and
// swap in what changed: new jobs appear, rows follow their jobs, finished ones get their reductions.
// (The status filter is a plain form with its own button: submitting on change would navigate
// away while a keyboard user is still arrowing through the options.)
const LIST_REFRESH_MS = 2000;

function initJobs() {
  let timer = null;
  let fetching = false;
  const schedule = (delay) => {
    if (document.hidden || fetching || timer !== null) return;
    timer = setTimeout(refresh, delay);
  };
  const refresh = async () => {
    timer = null;
    fetching = true;
    try {
      const response = await fetch(location.href, { credentials: "same-origin" });
      if (response.ok) mergeListing(new DOMParser().parseFromString(await response.text(), "text/html"));
    } catch (_) {
      // the server restarting or the network dropping for a moment: the next round tries again
    } finally {
      fetching = false;
    }
    schedule(LIST_REFRESH_MS);
  };
  // a hidden tab costs the server nothing; shown again, it catches up at once
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) {
      clearTimeout(timer);
      timer = null;
    } else {
      schedule(0);
    }
  });
  schedule(LIST_REFRESH_MS);
}

// Rows whose rendering is unchanged stay the same nodes, so nothing flickers and focus stays put.
function mergeListing(fresh) {
  const current = $("listing");
  const next = fresh.getElementById("listing");
  if (!next) return;
  const body = current.querySelector("tbody");
  const nextBody = next.querySelector("tbody");
  if (!body || !nextBody) {  // the first job arrived, or the last one left
    if (!current.isEqualNode(next)) current.replaceWith(document.importNode(next, true));
    return;
  }
  const known = new Map([...body.rows].map((row) => [row.id, row]));
  const wanted = [...nextBody.rows].map((row) => {
    const old = known.get(row.id);
    return old && old.isEqualNode(row) ? old : document.importNode(row, true);
  });
  wanted.forEach((row, index) => {
    if (body.rows[index] !== row) body.insertBefore(row, body.rows[index] || null);
  });
  [...body.rows].slice(wanted.length).forEach((row) => row.remove());
  const pager = current.querySelector(".pager");
  const nextPager = next.querySelector(".pager");
  if (!pager.isEqualNode(nextPager)) pager.replaceWith(document.importNode(nextPager, true));
}

// ---- new job: drag and drop, preflight on every change, submit with upload progress.
function initNewJob() {
  const form = $("job-form");
  const maxBytes = Number(form.dataset.maxBytes);
  let preflight = null;
  let timer = null;

  for (const zone of document.querySelectorAll(".drop")) {
    const input = $(zone.dataset.for);
    zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
    zone.addEventListener("dragleave", () => zone.classList.remove("over"));
    zone.addEventListener("drop", (event) => {
      event.preventDefault();
      zone.classList.remove("over");
      if (!event.dataTransfer.files.length) return;
      input.files = event.dataTransfer.files;
      input.dispatchEvent(new Event("change", { bubbles: true }));
    });
  }

  const macs = $("macs");
  const showMacs = () => { $("macs-out").textContent = macs.value + " %"; };
  macs.addEventListener("input", showMacs);
  showMacs();

  const fileOk = (name) => {
    const input = $(name);
    const box = $(name + "-error");
    const file = input.files[0];
    const tooBig = file && file.size > maxBytes;
    box.textContent = tooBig ? `${file.name} is ${file.size} bytes; this server takes at most ${maxBytes}.` : "";
    box.hidden = !tooBig;
    input.setAttribute("aria-invalid", tooBig ? "true" : "false");
    return !tooBig;
  };

  const schedule = () => {
    clearTimeout(timer);
    timer = setTimeout(runPreflight, 400);
  };
  form.addEventListener("change", (event) => {
    if (["job-name", "webhook", "device", "recovery-unit", "recovery", "final-recovery"].includes(event.target.id)) return;
    schedule();
  });

  // One preflight at a time: a request the page gave up on keeps the server busy all the same,
  // so a change made while one runs is checked when it returns.
  let again = false;
  function runPreflight() {
    const model = $("model").files[0];
    if (!model || !fileOk("model") || !fileOk("data")) return;
    if (preflight) {
      again = true;
      return;
    }
    const body = new FormData();
    body.append("model", model);
    if ($("data").files[0]) body.append("data", $("data").files[0]);
    const config = buildConfig();
    // without a size target the preflight still describes the model
    const target = config.target.macs_reduction || config.target.params_reduction ? config.target : null;
    body.append("config", JSON.stringify({ target, stages: config.stages, architecture: config.architecture,
                                           task: config.task }));
    const status = $("preflight-status");
    const section = $("preflight");
    status.textContent = "Uploading…";
    section.setAttribute("aria-busy", "true");
    $("preflight-error").hidden = true;
    preflight = upload("/v1/inspect", body, $("preflight-upload"), () => { status.textContent = "Checking the model…"; });
    preflight.done.then(({ status: code, text }) => {
      if (code === 200) {
        status.textContent = "Checked " + model.name + ($("data").files[0] ? " with " + $("data").files[0].name : "") + ".";
        showPreflight(JSON.parse(text));
      } else {
        status.textContent = "The preflight found a problem.";
        $("preflight-result").hidden = true;
        showError($("preflight-error"), apiError(code, text));
      }
    }).catch((error) => {
      status.textContent = "";
      showError($("preflight-error"), { message: error.message, hint: "Check that the server is running." });
    }).finally(() => {
      $("preflight-upload").hidden = true;
      section.setAttribute("aria-busy", "false");
      preflight = null;
      if (again) {
        again = false;
        runPreflight();
      }
    });
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const box = $("submit-error");
    box.hidden = true;
    const config = buildConfig();
    const missing = [["model", "a model file"], ["data", "a calibration data file"]]
      .filter(([name]) => !$(name).files[0]).map(([, what]) => what);
    let problem = null;
    if (missing.length) problem = { message: "Choose " + missing.join(" and ") + ".", hint: "Drop the files on the boxes above." };
    else if (!config.target.macs_reduction && !config.target.params_reduction) {
      problem = { message: "Set a MACs or a params reduction.", hint: "Move the MACs slider above 0 % or enter a params reduction." };
    } else if (!config.stages.length) problem = { message: "Pick at least one stage.", hint: "Tick filters, residual blocks or both." };
    else if (!fileOk("model") || !fileOk("data")) problem = { message: "A file is too large.", hint: "See the message at the file." };
    if (problem) { showError(box, problem); return; }
    // the server checks the files again on submit, after any preflight still running (never beside it)
    clearTimeout(timer);
    again = false;
    const button = $("submit");
    const status = $("submit-status");
    button.disabled = true;
    if (preflight) {
      status.textContent = "Waiting for the preflight to finish…";
      await preflight.done.catch(() => null);
    }
    const body = new FormData();
    body.append("model", $("model").files[0]);
    body.append("data", $("data").files[0]);
    body.append("config", JSON.stringify(config));
    status.textContent = "Uploading…";
    upload("/v1/jobs", body, $("submit-upload"), () => { status.textContent = "Checking and queueing…"; }).done
      .then(({ status: code, text }) => {
        if (code === 200 || code === 202) {
          location.assign("/ui/jobs/" + JSON.parse(text).id);
          return;
        }
        button.disabled = false;
        status.textContent = "";
        $("submit-upload").hidden = true;
        showError(box, apiError(code, text));
      })
      .catch((error) => {
        button.disabled = false;
        status.textContent = "";
        showError(box, { message: error.message, hint: "Check that the server is running and try again." });
      });
  });
}

function numberOrNull(id, scale = 1) {
  const value = $(id).value.trim();
  return value === "" ? null : Number(value) * scale;
}

// The JobConfig the API takes; a blank recovery field is left out so the server's default applies.
function buildConfig() {
  const macs = Number($("macs").value) / 100;
  const epochs = $("recovery-unit").value === "epochs";
  const recovery = {};
  for (const [id, name] of [["recovery", "recovery"], ["final-recovery", "final_recovery"]]) {
    const value = numberOrNull(id);
    if (value !== null) recovery[name + (epochs ? "_epochs" : "_iterations")] = epochs ? value : Math.round(value);
  }
  return {
    name: $("job-name").value.trim() || null,
    // an empty budget is left to the server: the task's default
    target: { macs_reduction: macs > 0 ? macs : null, params_reduction: numberOrNull("params", 0.01),
              max_accuracy_drop: numberOrNull("drop", 0.01) },
    task: $("task").value,
    stages: [...document.querySelectorAll("input[name=stages]:checked")].map((box) => box.value),
    architecture: $("architecture").value.trim() || null,
    device: $("device").value,
    recovery,
    webhook_url: $("webhook").value.trim() || null,
  };
}

const count = new Intl.NumberFormat("en", { notation: "compact", maximumSignificantDigits: 3 });
const pct = (value) => (value * 100).toFixed(1) + " %";

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.append(td);
}

function showPreflight(report) {
  $("pf-macs").textContent = count.format(report.macs);
  $("pf-params").textContent = count.format(report.params);
  // every input the model takes, by name: token ids and their attention mask, or an image and its features
  const inputs = report.inputs.map((input) => input.name + " " + input.shape.join("×") + " " + input.dtype).join("; ");
  $("pf-input").textContent = inputs + (report.num_classes === null ? "" : ", " + report.num_classes + " classes")
    + (report.samples ? ", " + report.samples + " samples" : "");
  $("pf-task").textContent = report.task + (report.task_reason ? " (inferred: " + report.task_reason + ")" : "");
  $("pf-budget").textContent = report.budget;
  $("pf-outputs").textContent = report.outputs.map((output) => output.name + " " + output.shape.join("×")).join(", ");
  $("pf-groups").textContent = String(report.prunable_groups.length);
  $("pf-blocks").textContent = String(report.blocks.length);
  $("pf-reachable").textContent = "MACs −" + pct(report.reachable_reduction.macs) + ", params −" + pct(report.reachable_reduction.params);
  const feasible = $("pf-feasible");
  feasible.textContent = report.feasible === null ? "no target set" : report.feasible ? "feasible" : "not feasible";
  feasible.className = report.feasible === false ? "error" : report.feasible ? "ok" : "";
  const estimate = report.estimate_seconds;
  $("pf-estimate").textContent = "about " + duration(estimate.gpu) + " on a GPU, " + duration(estimate.cpu) + " on a CPU"
    + (estimate.measured_on === "cpu" ? " (measured on the server's CPU" : " (measured on the server's GPU")
    + (typeof estimate.low_s === "number" ? ": " + duration(estimate.low_s) + " to " + duration(estimate.high_s) : "") + ")";
  const warning = report.budget_resolution && report.budget_resolution.warning;
  $("pf-problems").replaceChildren(...report.problems.concat(warning ? ["Warning: " + warning] : []).map((problem) => {
    const li = document.createElement("li");
    li.textContent = problem;
    return li;
  }));
  $("pf-not-count").textContent = String(report.not_prunable.length);
  $("pf-not").replaceChildren(...report.not_prunable.map((layer) => {
    const row = document.createElement("tr");
    [layer.name, layer.type, layer.reason].forEach((text) => cell(row, text));
    return row;
  }));
  $("pf-group-rows").replaceChildren(...report.prunable_groups.map((group) => {
    const row = document.createElement("tr");
    [group.name, String(group.width), String(group.min_width)].forEach((text) => cell(row, text));
    row.children[1].className = row.children[2].className = "num";
    return row;
  }));
  $("preflight-result").hidden = false;
}

function duration(seconds) {
  if (seconds < 90) return Math.max(1, Math.round(seconds)) + " s";
  if (seconds < 5400) return Math.round(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}

// ---- job page: Server-Sent Events while it runs; once it has finished, the server renders the results.
function initJob() {
  const live = $("live");
  const jobId = live.dataset.jobId;
  const cancel = $("cancel");
  if (cancel) {
    cancel.addEventListener("click", async () => {
      cancel.disabled = true;
      $("cancel-error").hidden = true;
      try {
        const response = await fetch("/v1/jobs/" + jobId + "/cancel", { method: "POST", credentials: "same-origin" });
        if (response.ok) {
          cancel.textContent = "Cancelling…";
          return;
        }
        showError($("cancel-error"), apiError(response.status, await response.text()));
      } catch (error) {
        showError($("cancel-error"), { message: error.message, hint: "Check that the server is running and try again." });
      }
      cancel.disabled = false;
    });
  }
  if (live.dataset.terminal === "true") return;
  const log = $("log");
  let lastMessage = null;
  const source = new EventSource("/v1/jobs/" + jobId + "/events");
  source.addEventListener("progress", (event) => {
    const data = JSON.parse(event.data);
    $("stage").textContent = data.stage || "";
    $("step").textContent = data.total_steps ? "step " + data.step + " of up to " + data.total_steps : "";
    if (typeof data.fraction === "number") $("progress").value = data.fraction;
    if (typeof data.elapsed_s === "number") {
      $("eta").textContent = duration(data.elapsed_s) + " elapsed"
        + (typeof data.eta_s === "number" ? " · about " + duration(data.eta_s) + " to go" : "");
    }
    if (data.message && data.message !== lastMessage) {
      lastMessage = data.message;
      $("message").textContent = data.message;
      const item = document.createElement("li");
      item.textContent = "[" + data.stage + "] " + data.message;
      log.append(item);
      log.scrollTop = log.scrollHeight;
    }
  });
  source.addEventListener("status", (event) => {
    const data = JSON.parse(event.data);
    $("job-status").replaceChildren(badge(data.status));
    if (TERMINAL.includes(data.status)) {
      source.close();  // else EventSource reconnects to a stream that has nothing more to say
      location.reload();
    } else {
      refreshAttempt();  // a worker claiming the job (or losing it) changes which attempt this is
    }
  });
  source.addEventListener("error", () => {
    if (source.readyState === EventSource.CLOSED) $("message").textContent = "Lost the connection; reload the page.";
  });
}

// The server words the attempt (waiting for one, or which one runs); take its rendering.
async function refreshAttempt() {
  try {
    const response = await fetch(location.href, { credentials: "same-origin" });
    if (!response.ok) return;
    const fresh = new DOMParser().parseFromString(await response.text(), "text/html").getElementById("attempt");
    if (fresh) $("attempt").textContent = fresh.textContent;
  } catch (_) {
    // the next status change tries again; the stale line is only a label
  }
}

const PAGES = { jobs: initJobs, "new-job": initNewJob, job: initJob };
document.addEventListener("DOMContentLoaded", () => {
  const init = PAGES[document.body.dataset.page];
  if (init) init();
});

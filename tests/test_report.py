"""report.json and the preflight keep the JSON shapes stored jobs and the UI read."""

from __future__ import annotations

import json
from pathlib import Path

from core.options import Target
from core.report import InputSignature, PreflightReport, Report, StepRecord, StopReason
from tests.report_fixtures import sample_report

REPORT_JSON_KEYS = {
    "macs_before", "macs_after", "params_before", "params_after", "macs_reduction", "params_reduction",
    "accuracy_metric", "accuracy_before", "accuracy_after", "eval_samples", "latency_ms_before", "latency_ms_after",
    "onnx_max_abs_diff", "onnx_max_abs_diff_before", "onnx_bytes_before", "onnx_bytes_after", "pt2_error",
    "removed_blocks", "blocks", "layers", "attention_heads", "steps", "target", "target_met", "reachable_reduction",
    "stop_reason", "message", "notes", "device", "options", "seconds", "resumed_at_step",
    "budget_resolution", "soft_agreement_before", "soft_agreement_after", "task", "budget", "phases", "peak_rss_mb",
}
# set by core.intake for uploads, and for Hugging Face uploads
UPLOAD_KEYS = {"input_format"}
HF_KEYS = {"hf_pretrained", "hf_pretrained_error"}
STEP_KEYS = {"stage", "step", "macs", "params", "accuracy", "seconds", "accepted"}
PREFLIGHT_JSON_KEYS = {
    "macs", "params", "num_classes", "inputs", "outputs", "input_shape", "input_dtype", "samples", "labeled",
    "prunable_groups",
    "not_prunable", "blocks", "reachable_reduction", "target", "feasible", "problems", "estimate_seconds", "notes",
    "seconds", "budget_resolution", "task", "task_reason", "metric", "budget",
}


def test_report_json_has_todays_keys_and_shapes() -> None:
    dumped = sample_report().model_dump(mode="json")
    assert set(dumped) == REPORT_JSON_KEYS
    assert dumped["removed_blocks"] == ["blocks.1"]
    assert dumped["blocks"] == [{"name": "blocks.1", "kind": "residual", "divergence": 0.125}]
    assert dumped["layers"][1] == {"name": "head", "channels_before": 10, "channels_after": 10, "divergence": None}
    assert dumped["attention_heads"] == [{"name": "encoder.0.attention", "heads_before": 4, "heads_after": 2}]
    assert dumped["latency_ms_before"] == {"batch_1": 1.0, "batch_32": 4.0}
    assert dumped["target"] == {"macs_reduction": 0.5, "params_reduction": None, "max_accuracy_drop": 0.01}
    assert dumped["options"]["stages"] == ["filters", "layers"] and dumped["options"]["lr"] == 1e-3
    assert dumped["stop_reason"] == "target_reached" and dumped["pt2_error"] is None


def test_steps_carry_only_their_stages_fields() -> None:
    filters, removal, declined = sample_report().model_dump(mode="json")["steps"]
    assert set(filters) == STEP_KEYS | {"units_removed", "recovery_kept"} and filters["stage"] == "filters"
    assert set(removal) == STEP_KEYS | {"block", "divergence", "recovery_kept"} and removal["stage"] == "layers"
    assert (filters["recovery_kept"], removal["recovery_kept"]) == (True, False)  # a False is written, not dropped
    assert set(declined) == STEP_KEYS | {"block", "divergence", "drift", "width_drift", "width_accuracy",
                                         "width_units_removed", "declined"}


def test_upload_keys_are_written_only_when_set() -> None:
    upload = sample_report(input_format="onnx").model_dump(mode="json")
    assert set(upload) == REPORT_JSON_KEYS | UPLOAD_KEYS
    failed_hf = sample_report(input_format="hf", hf_pretrained=None, hf_pretrained_error="no config")
    assert set(failed_hf.model_dump(mode="json")) == REPORT_JSON_KEYS | UPLOAD_KEYS | HF_KEYS
    assert failed_hf.model_dump(mode="json")["hf_pretrained"] is None


def test_report_json_round_trips(tmp_path: Path) -> None:
    for report in (sample_report(), sample_report(input_format="hf", hf_pretrained=None, hf_pretrained_error="x")):
        path = tmp_path / "report.json"
        report.write(path)
        again = Report.model_validate_json(path.read_text())
        assert again == report
        assert again.model_dump(mode="json") == json.loads(path.read_text())


def test_stop_reasons_keep_their_strings_and_say_why() -> None:
    assert [reason.value for reason in StopReason] == [
        "target_reached", "accuracy_budget", "max_steps", "nothing_left_to_prune", "no_removable_blocks",
        "max_removals", "width_beats_layers", "time_budget"]
    assert all(reason.explanation for reason in StopReason)
    assert json.dumps({"stop_reason": StopReason.MAX_STEPS}) == '{"stop_reason": "max_steps"}'


def test_headline_holds_the_job_metrics() -> None:
    report = sample_report()
    headline = report.headline().model_dump(mode="json")
    assert list(headline) == [
        "macs_before", "macs_after", "params_before", "params_after", "macs_reduction", "params_reduction",
        "accuracy_metric", "accuracy_before", "accuracy_after", "task", "budget", "latency_ms_before",
        "latency_ms_after", "onnx_max_abs_diff", "target_met", "stop_reason", "message", "removed_blocks", "device",
        "seconds", "pt2_error"]
    dumped = report.model_dump(mode="json")
    assert headline["removed_blocks"] == dumped["removed_blocks"] == ["blocks.1"]
    assert all(headline[key] == dumped[key] for key in headline)


def test_a_step_without_other_stages_fields_round_trips() -> None:
    step = StepRecord(stage="filters", step=1, macs=1, params=1, accuracy=0.5, seconds=1.0, accepted=True)
    assert StepRecord.model_validate_json(step.model_dump_json()) == step


def test_preflight_json_has_todays_keys() -> None:
    report = PreflightReport(
        macs=1000, params=200, task="classification", metric="top1",
        budget="top-1 accuracy may drop by at most 1.00 points", num_classes=10,
        inputs=[InputSignature(name="x", dtype="float32", shape=[1, 8, 8])],
        outputs=[{"name": "logits", "shape": [10]}], input_shape=[1, 8, 8], input_dtype="float32", samples=0,
        labeled=None,
        prunable_groups=[{"name": "stem", "width": 32, "min_width": 4}],
        not_prunable=[{"name": "fc", "type": "Linear", "reason": "output layer (its outputs are classes)"}],
        blocks=[{"name": "blocks.0", "kind": "residual"}], reachable_reduction={"macs": 0.9, "params": 0.9},
        target=Target(macs_reduction=0.5), feasible=True, problems=[],
        estimate_seconds={"cpu": 10.0, "gpu": 0.5, "measured_on": "cpu", "steps": 4, "train_step_s": 0.01},
        notes=[], seconds=1.0)
    assert set(report.model_dump(mode="json")) == PREFLIGHT_JSON_KEYS
    dumped = report.model_copy(update={"input_format": "npz"}).model_dump(mode="json")
    assert set(dumped) == PREFLIGHT_JSON_KEYS | UPLOAD_KEYS
    assert dumped["prunable_groups"] == [{"name": "stem", "width": 32, "min_width": 4}]
    assert dumped["inputs"] == [{"name": "x", "dtype": "float32", "shape": [1, 8, 8]}]
    assert dumped["estimate_seconds"]["measured_on"] == "cpu" and dumped["target"]["macs_reduction"] == 0.5
    assert PreflightReport.model_validate_json(json.dumps(dumped)) == report.model_copy(update={"input_format": "npz"})


def test_jobs_stored_with_a_count_of_removed_blocks_still_read() -> None:
    """Before the headline kept the names, jobs stored the count; the API serves as many unnamed entries."""
    from datetime import UTC, datetime

    from domain.models import Job
    from domain.read_model import UNRECORDED_BLOCK, job_out

    stored = sample_report().headline().model_dump(mode="json") | {"removed_blocks": 2}
    now = datetime.now(UTC)
    job = Job(id="j1", tenant_id="t", status="succeeded", queue="cpu", config={}, max_attempts=3, attempts=1,
              cancel_requested=False, progress={}, metrics=stored, created_at=now, updated_at=now, artifacts=[])
    out = job_out(job, "http://h")
    assert out.metrics is not None and out.metrics.removed_blocks == [UNRECORDED_BLOCK] * 2

"""Every number in a job config has bounds, NaN is called NaN, and a CUDA device no worker has is
refused at submit: each is a 422 that names the field, never a 500 or a job that fails later."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from api.app import create_app
from domain.config import JobConfig
from domain.settings import Settings
from tests.service.helpers import submit

OUT_OF_RANGE = [
    ("target.macs_reduction", 1.0), ("target.params_reduction", 0), ("target.max_accuracy_drop", 2),
    ("recovery.recovery_epochs", 1e9), ("recovery.recovery_iterations", 2**40), ("recovery.final_recovery_epochs", -1),
    ("recovery.final_recovery_iterations", 2**63), ("recovery.batch_size", 2**31), ("recovery.lr", 1e6),
    ("method.seed", 2**70), ("method.seed", -1), ("method.round_to", 2**40), ("method.min_width_fraction", 0),
    ("method.max_steps", 10**9), ("method.max_removals", -1), ("method.eval_fraction", 1),
    ("method.time_budget_s", 1e12), ("image_size", 10**6), ("max_length", 10**7), ("mean", [1e300]), ("std", [0]),
]


def _config(field: str, value: Any) -> dict[str, Any]:
    config: dict[str, Any] = {"target": {"macs_reduction": 0.5}}
    *parents, name = field.split(".")
    node = config
    for parent in parents:
        node = node.setdefault(parent, {})
    node[name] = value
    return config


@pytest.mark.parametrize(("field", "value"), OUT_OF_RANGE)
def test_every_number_is_bounded(field: str, value: Any) -> None:
    with pytest.raises(ValidationError) as caught:
        JobConfig.model_validate(_config(field, value))
    assert [".".join(str(p) for p in error["loc"] if not isinstance(p, int)) for error in caught.value.errors()] == [
        field]


@pytest.mark.parametrize("field", ["target.macs_reduction", "target.max_accuracy_drop", "recovery.lr",
                                   "method.time_budget_s", "mean"])
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinities_are_called_what_they_are(field: str, value: str) -> None:
    text = json.dumps(_config(field, [None] if field == "mean" else None)).replace("null", value)
    with pytest.raises(ValidationError, match="finite number"):
        JobConfig.model_validate_json(text)


def test_recovery_norm_statistics_are_one_of_the_choices() -> None:
    config = JobConfig.model_validate({"target": {"macs_reduction": 0.5}, "recovery": {"norm_statistics": "frozen"}})
    assert config.options_core().norm_statistics == "frozen"
    with pytest.raises(ValidationError, match="norm_statistics"):
        JobConfig.model_validate({"target": {"macs_reduction": 0.5}, "recovery": {"norm_statistics": "sometimes"}})


def test_the_largest_allowed_values_are_accepted() -> None:
    config = JobConfig.model_validate({"target": {"macs_reduction": 0.5}, "method": {"seed": 2**32 - 1},
                                       "recovery": {"batch_size": 65_536}})
    assert config.options_core().seed == 2**32 - 1 and not math.isnan(config.target.macs_reduction or 0)


def _error(response: Any) -> dict[str, Any]:
    assert response.status_code == 422, response.text
    return response.json()["error"]


def test_over_http_a_huge_seed_and_nan_are_422(client: TestClient, keys: dict[str, str],
                                               digits: tuple[Path, Path]) -> None:
    error = _error(submit(client, keys["a"], digits, {"method": {"seed": 2**70}}))
    assert error["code"] == "invalid_config" and "method.seed" in error["message"]
    nan = submit(client, keys["a"], digits, {"target": {"macs_reduction": float("nan")}})
    error = _error(nan)
    assert "target.macs_reduction" in error["message"] and "finite number" in error["message"]


def test_a_cuda_device_no_worker_has_is_refused_at_submit(client: TestClient, settings: Settings,
                                                          keys: dict[str, str], digits: tuple[Path, Path]) -> None:
    """The workers report one CUDA device (the gpu_reported fixture)."""
    error = _error(submit(client, keys["a"], digits, {"device": "cuda:99"}))
    assert error["code"] == "device_unavailable" and "cuda:0 to cuda:0" in error["message"]
    assert submit(client, keys["a"], digits, {"device": "cuda:0"}).status_code == 202
    # reports older than device_report_ttl_s do not count: then no worker has a CUDA device at all
    stale = settings.model_copy(update={"device_report_ttl_s": 0.0})
    with TestClient(create_app(stale)) as other:
        error = _error(submit(other, keys["a"], digits, {"device": "cuda"}))
    assert error["code"] == "device_unavailable" and "No worker reports a CUDA device" in error["message"]

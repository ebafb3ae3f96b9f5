"""The API's preflight: core's file intake check, run on the upload before a job is accepted."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

from api.errors import ApiError
from api.schemas import InspectConfig
from core import PreflightReport, UserError
from core.intake.files import inspect_files
from domain.config import JobConfig, intake_options
from domain.settings import Settings

# torch.fx's symbolic tracing (block discovery, ONNX conversion) patches nn.Module.__call__ for the
# whole process while it runs, so a second preflight in another thread would trace through the
# first one's forward passes. Preflights in one API process therefore run one at a time.
_TRACING = threading.Lock()


def preflight(settings: Settings, config: JobConfig | InspectConfig, model: Path, data: Path | None) -> PreflightReport:
    """core's preflight; a UserError becomes a 422 that says what to fix.

    It runs on the API's CPU: a job asking for CUDA is checked here and run on a GPU worker."""
    options = dataclasses.replace(config.options_core(), device="cpu")
    try:
        with _TRACING:
            return inspect_files(model, data, config.target_core(), options, intake_options(settings, config))
    except UserError as err:
        raise ApiError.from_user_error(err) from err


def require_feasible(report: PreflightReport) -> None:
    if report.feasible is not False:  # None: no target given, nothing to be feasible for
        return
    problems = " ".join(report.problems or ["no details"])
    raise ApiError(422, "preflight_failed", f"The preflight check failed: {problems}",
                   "POST the same files to /v1/inspect for the full preflight report.")

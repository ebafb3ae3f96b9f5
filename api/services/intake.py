"""The bridge to core's file intake: the limits come from the settings, the hints from the job config."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any

from api.errors import ApiError
from api.schemas import InspectConfig, JobConfig
from api.settings import Settings
from core import UserError
from core.intake.files import inspect_files
from core.options import IntakeOptions


def intake_options(settings: Settings, config: JobConfig | InspectConfig) -> IntakeOptions:
    return IntakeOptions(
        architecture=config.architecture,
        allow_pickle=settings.allow_pickle,
        image_size=config.image_size,
        mean=tuple(config.mean),
        std=tuple(config.std),
        text_column=config.text_column,
        label_column=config.label_column,
        max_length=config.max_length,
        max_file_bytes=settings.max_upload_bytes,
        max_zip_members=settings.max_zip_members,
        max_unpacked_bytes=settings.max_unpacked_bytes,
        max_samples=settings.max_samples,
    )


# torch.fx's symbolic tracing (block discovery, ONNX conversion) patches nn.Module.__call__ for the
# whole process while it runs, so a second preflight in another thread would trace through the
# first one's forward passes. Preflights in one API process therefore run one at a time.
_TRACING = threading.Lock()


def preflight(settings: Settings, config: JobConfig | InspectConfig, model: Path, data: Path | None) -> dict[str, Any]:
    """core's preflight; a UserError becomes a 422 that says what to fix.

    It runs on the API's CPU: a job asking for CUDA is checked here and run on a GPU worker."""
    options = dataclasses.replace(config.options_core(), device="cpu")
    try:
        with _TRACING:
            return inspect_files(model, data, config.target_core(), options, intake_options(settings, config))
    except UserError as err:
        raise ApiError.from_user_error(err) from err


def require_feasible(report: dict[str, Any]) -> None:
    if report.get("feasible") is not False:  # None: no target given, nothing to be feasible for
        return
    problems = [str(problem.get("message", problem)) if isinstance(problem, dict) else str(problem)
                for problem in report.get("problems", [])]
    raise ApiError(422, "preflight_failed", "The preflight check failed: " + " ".join(problems or ["no details"]),
                   "POST the same files to /v1/inspect for the full preflight report.")

"""The API's preflight: core's intake checks and preflight, run on an upload before a job is
accepted, in a sandbox process (api.services.inspector); the API process never reads the files."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from pydantic import ValidationError

from api.errors import ApiError
from api.schemas import InspectConfig
from api.services.sandbox import Busy, Failure, Limits, SandboxError, SandboxPool
from core import PreflightReport
from domain.config import JobConfig, intake_options
from domain.read_model import ErrorOut
from domain.settings import Settings

INSPECTOR = "api.services.inspector"
RETRY_AFTER_S = 10


def sandbox_pool(settings: Settings, scratch_root: Path) -> SandboxPool:
    limits = Limits(memory_bytes=settings.inspect_memory_bytes, cpu_s=settings.inspect_cpu_s,
                    wall_s=settings.inspect_timeout_s)
    return SandboxPool(INSPECTOR, settings.inspect_workers, limits, settings.inspect_max_pending, scratch_root)


@contextmanager
def admitted(sandbox: SandboxPool) -> Iterator[None]:
    """A place for one upload to be received and checked, or 429."""
    try:
        with sandbox.admit():
            yield
    except Busy as exc:
        raise ApiError(429, "too_many_uploads", f"The server is busy checking uploads ({exc}).",
                       f"Send it again in {RETRY_AFTER_S} s.", {"Retry-After": str(RETRY_AFTER_S)}) from exc


async def preflight(sandbox: SandboxPool, settings: Settings, config: JobConfig | InspectConfig, model: Path,
                    data: Path | None) -> PreflightReport:
    """core's preflight of the uploaded files, run in a sandbox; what the files got wrong is a 422 that
    says what to fix, and so is a file that crashed, exhausted or outlasted its sandbox."""
    request = {"kind": "job" if isinstance(config, JobConfig) else "inspect", "config": config.model_dump(mode="json"),
               "intake": dataclasses.asdict(intake_options(settings, config)), "model": str(model),
               "data": None if data is None else str(data)}
    try:
        answer = await sandbox.run(request)
        if "error" in answer:
            error = ErrorOut.model_validate(answer["error"])
            raise ApiError(422, error.code, error.message, error.hint)
        return PreflightReport.model_validate(answer["report"])
    except SandboxError as exc:
        raise _refusal(exc, settings) from exc
    except (KeyError, ValidationError) as exc:  # the child is not trusted to answer well
        raise _refusal(SandboxError(Failure.CRASHED, "it answered something malformed"), settings) from exc


def _refusal(exc: SandboxError, settings: Settings) -> ApiError:
    if exc.failure == Failure.TIMEOUT:
        return ApiError(422, "inspection_timeout", f"Checking the upload took too long ({exc.message}; the limits are "
                        f"{settings.inspect_timeout_s:g} s, {settings.inspect_cpu_s} s of CPU).",
                        "Upload a smaller model or less data, or ask the operator to raise IDAP_INSPECT_TIMEOUT_S "
                        "and IDAP_INSPECT_CPU_S.")
    if exc.failure == Failure.OUT_OF_MEMORY:
        return ApiError(422, "inspection_out_of_memory", f"Checking the upload needed more than "
                        f"{settings.inspect_memory_bytes / 2**30:.1f} GiB of memory.",
                        "Upload a smaller model or less data, or ask the operator to raise IDAP_INSPECT_MEMORY_BYTES.")
    if exc.failure == Failure.CRASHED:
        return ApiError(422, "inspection_crashed", f"Reading the upload crashed the process that checked it "
                        f"({exc.message}).", "The file may be corrupt: check that it loads where it was made, "
                        "then upload it again.")
    if exc.failure == Failure.UNAVAILABLE:
        return ApiError(503, "inspection_unavailable", "No process to check the upload could be started.",
                        f"Try again in {RETRY_AFTER_S} s; ask the operator to check the API's logs if it persists.",
                        {"Retry-After": str(RETRY_AFTER_S)})
    return ApiError(500, "internal_error", f"Checking the upload failed unexpectedly ({exc.message}).",
                    "Ask the operator to check the API's logs.")


def require_feasible(report: PreflightReport) -> None:
    if report.feasible is not False:  # None: no target given, nothing to be feasible for
        return
    problems = " ".join(report.problems or ["no details"])
    raise ApiError(422, "preflight_failed", f"The preflight check failed: {problems}",
                   "POST the same files to /v1/inspect for the full preflight report.")

"""The preflight's sandboxed side: `python -m api.services.inspector`, the program of the API's
sandbox processes (api.services.sandbox), never imported by the server.

A request names the uploaded files on local disk, the kind and JSON of the config, and the intake
options (the limits come from the server's settings); the answer is core's preflight report, or
the UserError that says what to fix.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from api.schemas import InspectConfig
from api.services.sandbox import serve
from core import UserError
from core.intake.files import inspect_files
from core.options import IntakeOptions
from domain.config import JobConfig

CONFIGS: dict[str, type[JobConfig] | type[InspectConfig]] = {"job": JobConfig, "inspect": InspectConfig}


def handle(request: dict[str, Any]) -> dict[str, Any]:
    config = CONFIGS[request["kind"]].model_validate(request["config"])
    intake = request["intake"]
    intake = IntakeOptions(**intake | {"mean": tuple(intake["mean"]), "std": tuple(intake["std"])})
    # on the API host's CPU: a job asking for CUDA is checked here and runs on a GPU worker
    options = dataclasses.replace(config.options_core(), device="cpu")
    data = request.get("data")
    try:
        report = inspect_files(Path(request["model"]), None if data is None else Path(data), config.target_core(),
                               options, intake)
    except UserError as err:
        return {"error": {"code": err.code, "message": err.message, "hint": err.hint}}
    return {"report": report.model_dump(mode="json")}


if __name__ == "__main__":
    torch.set_num_threads(1)
    serve(handle)

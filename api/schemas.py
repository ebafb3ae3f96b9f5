"""Request and response bodies of API v1 that only the API uses (the job config and the job read
model live in the domain, shared with the worker)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from core import CompressOptions, Target
from core.options import Stage
from domain.config import InputHints, MethodIn, TargetIn
from domain.read_model import JobOut


class InspectConfig(InputHints):
    """The `config` part of POST /v1/inspect: what the preflight needs, target optional."""

    target: TargetIn | None = None
    stages: list[Stage] = Field(default_factory=lambda: list(Stage), min_length=1, max_length=len(Stage))
    method: MethodIn = MethodIn()

    def target_core(self) -> Target | None:
        return Target(**self.target.model_dump()) if self.target else None

    def options_core(self) -> CompressOptions:
        method = self.method.model_dump()
        method["ignored_layers"] = tuple(method["ignored_layers"])
        return CompressOptions(stages=tuple(self.stages), device="cpu", task=self.task,
                               detection_decoder=self.detection_decoder, output=self.output, **method)


class JobList(BaseModel):
    jobs: list[JobOut]
    next_cursor: str | None


class WebhookDeliveryOut(BaseModel):
    event_id: str
    event_type: str
    url: str
    attempt: int
    status_code: int | None
    error: str | None
    succeeded: bool
    will_retry: bool
    created_at: datetime


class WebhookDeliveryList(BaseModel):
    deliveries: list[WebhookDeliveryOut]

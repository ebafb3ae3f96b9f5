"""Request and response bodies of API v1 that only the API uses (the job config and the job read
model live in the domain, shared with the worker)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field

from core import CompressOptions, Target
from core.options import Stage
from domain.config import InputHints, MethodIn, TargetIn
from domain.read_model import JobOut
from domain.workers import WorkerKind


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


class WorkerOut(BaseModel):
    name: str = Field(description="Celery node name; gpuN@host for a worker pinned to GPU N")
    kind: WorkerKind = Field(description="gpu: takes the gpu queue and sees a CUDA device; cpu: takes a job queue "
                                         "otherwise; webhooks: delivers webhooks only")
    queues: list[str]
    cuda_devices: int = Field(description="CUDA devices the worker sees (1 when pinned to a GPU)")
    pinned_gpu: int | None = Field(description="the host's index (nvidia-smi's) of the GPU it is pinned to; "
                                               "null: not pinned")
    started_at: datetime
    seen_at: datetime


class QueueOut(BaseModel):
    """The whole service, every tenant: jobs waiting and running, and the workers seen within
    IDAP_DEVICE_REPORT_TTL_S (each reports itself every IDAP_REAPER_INTERVAL_S)."""

    queued: int = Field(description="jobs waiting for a worker")
    queued_by_queue: dict[str, int] = Field(description="waiting jobs by the queue they wait on (cpu, gpu)")
    running: int
    workers_live: int
    gpu_workers_live: int
    workers_by_kind: dict[WorkerKind, int]
    gpus: list[int] = Field(description="the GPUs (host indices) that live pinned GPU workers hold")
    workers: list[WorkerOut] = Field(description="the live workers, by name")

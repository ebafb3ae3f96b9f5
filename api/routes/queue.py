"""/v1/queue: the service's queue and its live workers, for operators and dashboards."""

from __future__ import annotations

from fastapi import APIRouter

from api.auth import CallerDep
from api.deps import SessionDep, SettingsDep
from api.schemas import QueueOut
from api.services import queue
from domain.read_model import ErrorOut

router = APIRouter(prefix="/v1", tags=["queue"], responses={401: {"model": ErrorOut}})


@router.get("/queue", response_model=QueueOut, summary="Jobs waiting and running, and the live workers",
            description="Counts every tenant's jobs (no job is named). A worker is live when it reported itself "
                        "within IDAP_DEVICE_REPORT_TTL_S; a GPU worker takes the gpu queue and sees a CUDA device, "
                        "and one started with `idap worker --gpus N` names the GPU it is pinned to.")
def get_queue(session: SessionDep, settings: SettingsDep, _tenant: CallerDep) -> QueueOut:
    return queue.queue_view(session, settings)

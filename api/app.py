"""`create_app(settings)`: the FastAPI application (OpenAPI at /docs)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from prometheus_client import CollectorRegistry

from api import errors, openapi
from api.routes import health, inspect, jobs, queue, ui
from api.services.intake import sandbox_pool
from api.services.jobs import scratch_root
from api.services.metrics import DatabaseCollector
from api.ui.render import STATIC
from domain.outbox import Relay
from domain.queue import CeleryQueue
from domain.settings import Settings, get_settings
from domain.storage import open_storage


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    """The sandbox processes that check uploads and the relay that sends committed jobs to the broker
    live as long as the server."""
    settings: Settings = app.state.settings
    app.state.sandbox = sandbox_pool(settings, scratch_root(settings))
    if app.state.start_sandboxes:
        app.state.sandbox.start()
    app.state.relay = Relay(settings.database, app.state.queue, settings.dispatch_interval_s).start()
    try:
        yield
    finally:
        app.state.relay.stop()
        await app.state.sandbox.close()


def create_app(settings: Settings | None = None, start_sandboxes: bool = False) -> FastAPI:
    """`start_sandboxes`: start the processes that check uploads with the server (`idap serve` does),
    rather than on the first upload (apps made by tests, which mostly upload nothing)."""
    settings = settings or get_settings()
    # the OpenAPI document and /docs are served by api.openapi (behind a key when keys are required)
    app = FastAPI(title="IDAP++ Compress", version="1", description="Structured pruning of neural networks as a "
                  "service: submit a model and calibration data, get a smaller ONNX / .pt2 model and a report.",
                  docs_url=None, redoc_url=None, openapi_url=None, lifespan=_lifespan)
    app.state.settings = settings
    app.state.start_sandboxes = start_sandboxes
    app.state.storage = open_storage(settings.storage, settings.s3_endpoint_url)
    app.state.queue = CeleryQueue(settings)
    app.state.registry = CollectorRegistry()
    app.state.registry.register(DatabaseCollector(settings))
    if not settings.auth_required:
        # Without keys, a web page could reach this server through a DNS name rebound to 127.0.0.1;
        # answering only to loopback host names closes that door.
        app.add_middleware(errors.LoopbackHosts)
    errors.install(app)
    openapi.install(app, settings)
    app.include_router(jobs.router)
    app.include_router(inspect.router)
    app.include_router(queue.router)
    app.include_router(health.router)
    app.include_router(ui.router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")
    return app

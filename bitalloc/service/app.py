"""The FastAPI application: ``create_app(settings)``; ``bitalloc serve`` runs it under uvicorn."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.exceptions import RequestValidationError

from bitalloc.service import dashboard
from bitalloc.service.api import artifacts, errors, exports, fronts, health, jobs
from bitalloc.service.context import Context
from bitalloc.service.dashboard import api as dashboard_api
from bitalloc.service.prometheus import registry_for
from bitalloc.service.reaper import Reaper
from bitalloc.service.settings import Settings, get_settings
from bitalloc.service.worker import LocalWorkers


def create_app(settings: Settings | None = None) -> FastAPI:
    """Connect and migrate now; start the reaper (and, embedded, the worker threads) with the app."""
    settings = settings or get_settings()
    ctx = Context.create(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        reaper = Reaper(ctx)
        workers = LocalWorkers(ctx, settings.worker_threads) if ctx.embedded else None
        reaper.start()
        if workers is not None:
            workers.start()
        try:
            yield
        finally:
            if workers is not None:
                workers.stop()
            reaper.stop()
            ctx.close()

    app = FastAPI(title="bitalloc", version="1", lifespan=lifespan, docs_url="/v1/docs", redoc_url=None,
                  openapi_url="/v1/openapi.json",
                  description="Mixed-precision bit-allocation search: submit a model and budgets, read the "
                              "Pareto front, download the configuration at a point.")
    app.add_exception_handler(RequestValidationError, errors.validation_error)  # type: ignore[arg-type]
    app.add_middleware(errors.BodyLimit, max_bytes=settings.max_request_bytes)
    app.state.ctx = ctx
    app.state.registry = registry_for(ctx)
    v1 = APIRouter(prefix="/v1")
    for router in (jobs.router, fronts.router, artifacts.router, dashboard_api.router):
        v1.include_router(router, responses=errors.AUTHENTICATED)
    v1.include_router(exports.router)
    app.include_router(v1)
    app.include_router(health.router)
    dashboard.mount(app)
    return app

"""Liveness, readiness and Prometheus metrics (no token needed)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from bitalloc.service.api.deps import ContextDep
from bitalloc.service.db import current_revision, head_revision

router = APIRouter(tags=["health"])


@router.get("/v1/health")
def health() -> dict:
    """The process is up."""
    return {"status": "ok"}


@router.get("/v1/ready", responses={503: {"description": "A dependency is down or the schema is not migrated."}})
def ready(ctx: ContextDep, response: Response) -> dict:
    """Ready to take jobs: the database answers at the latest migration, and the queue answers."""
    checks: dict[str, str] = {}
    try:
        with ctx.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        revision, head = current_revision(ctx.engine), head_revision()
        checks["database"] = "ok" if revision == head else f"schema at {revision}, expected {head}: run `bitalloc db upgrade`"
    except Exception as exc:
        checks["database"] = f"error: {exc}"
    try:
        ctx.queue.check()
        checks["queue"] = "ok"
    except Exception as exc:
        checks["queue"] = f"error: {exc}"
    ok = all(v == "ok" for v in checks.values())
    response.status_code = status.HTTP_200_OK if ok else status.HTTP_503_SERVICE_UNAVAILABLE
    return {"status": "ready" if ok else "not ready", "checks": checks,
            "mode": "embedded" if ctx.embedded else "queue"}


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)

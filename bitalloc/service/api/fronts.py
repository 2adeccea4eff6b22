"""A job's front, its points (allocations) and the configuration of a point, in any export format."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from sqlalchemy import select
from sqlalchemy.orm import Session

from bitalloc.quant.export import ExportError, ExportName, list_exporters
from bitalloc.service import models, results
from bitalloc.service.api.deps import ContextDep, PointId, TokenDep
from bitalloc.service.api.immutable import etag_of, immutable
from bitalloc.service.db import transaction
from bitalloc.service.models import AllocationRecord, PointRecord
from bitalloc.service.schemas import FrontOut, PointDetail

router = APIRouter(prefix="/jobs/{job_id}", tags=["fronts"])

NOT_MODIFIED = {304: {"description": "The client's copy (its ETag in If-None-Match) is current."}}
RESPONSES = {404: {"description": "No such job (or point) for this token."},
             409: {"description": "The job has not succeeded, so it has no front."}}
# What a point shows without its unit -> format map (the front lists many points; the map is per point).
POINT_COLUMNS = (
    PointRecord.id,
    PointRecord.rank,
    PointRecord.on_front,
    PointRecord.chosen,
    AllocationRecord.avg_bits,
    AllocationRecord.bytes,
    AllocationRecord.error,
    AllocationRecord.latency,
    AllocationRecord.measured.label("measured_kl"),
)


def load_front(
    session: Session, token_id: int, job_id: uuid.UUID
) -> tuple[models.JobRecord, models.FrontRecord, models.ProfileRecord]:
    """The token's job with its front and profile (one query); 404 or 409 otherwise."""
    row = session.execute(
        select(models.JobRecord, models.FrontRecord, models.ProfileRecord)
        .outerjoin(models.FrontRecord, models.FrontRecord.job_id == models.JobRecord.id)
        .outerjoin(models.ProfileRecord, models.ProfileRecord.id == models.FrontRecord.profile_id)
        .where(models.JobRecord.id == job_id, models.JobRecord.token_id == token_id)
    ).first()
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "job not found")
    job, front, profile = row
    if front is None:
        raise HTTPException(status.HTTP_409_CONFLICT, f"job is {job.state}: a front is stored when it succeeds")
    return job, front, profile


def load_point(
    session: Session, token_id: int, job_id: uuid.UUID, point_id: int
) -> tuple[models.JobRecord, models.PointRecord, models.ProfileRecord]:
    job, front, profile = load_front(session, token_id, job_id)
    point = session.scalar(select(PointRecord).where(PointRecord.id == point_id, PointRecord.front_id == front.id))
    if point is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "point not found in this job's front")
    return job, point, profile


def point_detail(point: PointRecord) -> dict:
    a = point.allocation
    return {
        "id": point.id,
        "rank": point.rank,
        "avg_bits": a.avg_bits,
        "bytes": a.bytes,
        "error": a.error,
        "latency": a.latency,
        "measured_kl": a.measured,
        "on_front": point.on_front,
        "chosen": point.chosen,
        "solver": a.solver,
        "formats": a.formats,
        "info": a.info,
    }


@router.get("/front", response_model=FrontOut, responses={**RESPONSES, **NOT_MODIFIED})
def read_front(
    job_id: uuid.UUID,
    request: Request,
    ctx: ContextDep,
    token_id: TokenDep,
    all_points: Annotated[bool, Query(description="Include a chosen point that is not on the front.")] = False,
) -> Response:
    """The error/size front, smallest first; each point's id downloads its configuration. Immutable
    once stored: send its ``ETag`` back in ``If-None-Match`` for a 304."""
    with ctx.sessions() as session:
        job, front, profile = load_front(session, token_id, job_id)

    def render() -> bytes:
        with ctx.sessions() as session:
            rows = session.execute(select(*POINT_COLUMNS)
                                   .join(AllocationRecord, PointRecord.allocation_id == AllocationRecord.id)
                                   .where(PointRecord.front_id == front.id).order_by(PointRecord.rank)).mappings().all()
        return FrontOut.model_validate({
            "job_id": job.id,
            "axes": front.axes,
            "solver": front.solver,
            "profile": {
                "key": profile.key,
                "sha256": profile.sha256,
                "model": profile.model,
                "metric": profile.metric,
                "method": profile.method,
                "units": profile.units,
                "formats": profile.formats,
                "latency_source": profile.meta.get("latency_source"),
            },
            "chosen_point_id": next((row["id"] for row in rows if row["chosen"]), None),
            "points": [dict(row) for row in rows if row["on_front"] or all_points],
        }).model_dump_json().encode()

    return immutable(request, etag_of("front", job.id, front.id, all_points), render)


@router.get("/points/{point_id}", response_model=PointDetail, responses={**RESPONSES, **NOT_MODIFIED})
def read_point(job_id: uuid.UUID, point_id: PointId, request: Request, ctx: ContextDep, token_id: TokenDep) -> Response:
    """One point with its allocation (unit -> format); immutable once stored, like the front."""
    with ctx.sessions() as session:
        job, point, _ = load_point(session, token_id, job_id, point_id)
        detail = PointDetail.model_validate(point_detail(point)).model_dump_json().encode()
    return immutable(request, etag_of("point", job.id, point.id), lambda: detail)


@router.get(
    "/allocation",
    response_model=PointDetail,
    responses={**RESPONSES, 404: {"description": "No such job for this token, or the job had no budget."}},
)
def read_chosen(job_id: uuid.UUID, ctx: ContextDep, token_id: TokenDep) -> dict:
    """The allocation solved at the job's budget."""
    with ctx.sessions() as session:
        _, front, _ = load_front(session, token_id, job_id)
        chosen = session.scalar(
            select(PointRecord).where(PointRecord.front_id == front.id, PointRecord.chosen.is_(True))
        )
        if chosen is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "the job had no budget, so no point was chosen")
        return point_detail(chosen)


@router.get(
    "/points/{point_id}/config",
    responses={
        **RESPONSES,
        200: {
            "content": {e["media_type"]: {} for e in list_exporters()},
            "description": "The configuration file (Content-Disposition names it; X-Content-SHA256 is its sha256).",
        },
        **NOT_MODIFIED,
        410: {"description": "The job's profile is no longer in storage."},
        422: {"description": "The format cannot express this allocation; `detail` names each unit and why."},
    },
)
def download_config(
    job_id: uuid.UUID,
    point_id: PointId,
    request: Request,
    ctx: ContextDep,
    token_id: TokenDep,
    format: Annotated[ExportName, Query(description="An export from GET /v1/exports.")] = "json",
) -> Response:
    """Download a point's configuration in a runtime's format; it is kept as an artifact of the job (by content hash)."""
    try:
        with transaction(ctx.sessions) as session:
            job, point, profile = load_point(session, token_id, job_id, point_id)
            artifact, exported = results.config_artifact(session, ctx.storage, job, point, profile, format)
    except ExportError as exc:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(exc)) from exc
    except FileNotFoundError as exc:
        raise HTTPException(status.HTTP_410_GONE, "the job's profile is no longer in storage") from exc
    headers = {
        "Content-Disposition": f'attachment; filename="{artifact.name}"',
        "X-Content-SHA256": artifact.sha256,
        "X-Artifact-Id": str(artifact.id),
    }
    return immutable(request, f'"{artifact.sha256}"', lambda: exported.data, exported.media_type, headers)

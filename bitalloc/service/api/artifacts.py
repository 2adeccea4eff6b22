"""Artifacts (profiles, configurations, quantized models): list a job's, download one, and build
a point's packed artifact in the background (a build, polled at ``/v1/builds/{id}``)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, HTTPException, Response, status
from fastapi.responses import FileResponse
from sqlalchemy import select
from sqlalchemy.orm import Session

from bitalloc.service import builds, jobs, models
from bitalloc.service.api.deps import ContextDep, LogOffset, PointId, TokenDep
from bitalloc.service.api.jobs import NOT_FOUND, enqueue, load_job
from bitalloc.service.db import transaction
from bitalloc.service.schemas import ArtifactOut, BuildCreate, BuildOut, LogLine

router = APIRouter(tags=["artifacts"])

BUILD_NOT_FOUND = {404: {"description": "No such build for this token."}}


@router.get("/jobs/{job_id}/artifacts", response_model=list[ArtifactOut], responses=NOT_FOUND)
def list_artifacts(job_id: uuid.UUID, ctx: ContextDep, token_id: TokenDep) -> list[models.ArtifactRecord]:
    with ctx.sessions() as session:
        load_job(session, token_id, job_id)
        return list(session.scalars(select(models.ArtifactRecord).where(models.ArtifactRecord.job_id == job_id)
                                    .order_by(models.ArtifactRecord.created_at)))


@router.get("/artifacts/{artifact_id}", response_class=FileResponse,
            responses={404: {"description": "No such artifact for this token."}})
def download_artifact(artifact_id: uuid.UUID, ctx: ContextDep, token_id: TokenDep) -> FileResponse:
    with ctx.sessions() as session:
        artifact = session.scalar(select(models.ArtifactRecord).where(models.ArtifactRecord.id == artifact_id,
                                                                models.ArtifactRecord.token_id == token_id))
    if artifact is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "artifact not found")
    path = ctx.storage.path(artifact.sha256)
    if not path.is_file():
        raise HTTPException(status.HTTP_410_GONE, "the artifact's bytes are no longer in storage")
    return FileResponse(path, media_type=artifact.media_type, filename=artifact.name,
                        headers={"X-Content-SHA256": artifact.sha256})


def build_out(build: models.BuildRecord) -> dict:
    job, artifact = build.job, build.artifact
    return {"id": job.id, "job_id": build.parent_id, "point_id": build.point_id, "method": build.method,
            "target": build.target,
            "state": job.state, "progress": job.progress, "error": job.error, "attempts": job.attempts,
            "created_at": job.created_at, "started_at": job.started_at, "finished_at": job.finished_at,
            "artifact": None if artifact is None else
            {"id": artifact.id, "name": artifact.name, "sha256": artifact.sha256, "size": artifact.size}}


def load_build(session: Session, token_id: int, build_id: uuid.UUID) -> models.BuildRecord:
    build = builds.get_build(session, token_id, build_id)
    if build is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "build not found")
    return build


@router.post("/jobs/{job_id}/points/{point_id}/artifact", response_model=BuildOut,
             status_code=status.HTTP_202_ACCEPTED, responses={
                 200: {"description": "This point's artifact is already built or being built: that build."},
                 400: {"description": "The (optional) body is not JSON text (e.g. not UTF-8)."},
                 404: {"description": "No such job (or point) for this token."},
                 409: {"description": "The job has not succeeded, so it has no points."},
                 503: {"description": "The job queue is unavailable."}})
def build_point(job_id: uuid.UUID, point_id: PointId, ctx: ContextDep, token_id: TokenDep, response: Response,
                body: BuildCreate | None = None) -> dict:
    """Build the point's packed artifact in the background; poll ``/v1/builds/{id}``, then download
    its ``artifact``. Asking again returns the build that is queued, running or done (a failed or
    canceled one is built afresh)."""
    body = body or BuildCreate()
    with transaction(ctx.sessions) as session:
        job = load_job(session, token_id, job_id)
        if job.state != "succeeded":
            raise HTTPException(status.HTTP_409_CONFLICT, f"job is {job.state}: a point's artifact is built once it succeeds")
        point = session.scalar(select(models.PointRecord).join(models.FrontRecord)
                               .where(models.PointRecord.id == point_id, models.FrontRecord.job_id == job.id))
        if point is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, "point not found in this job's front")
        build, created = builds.submit(session, job, point.id, body.method, body.target, ctx.settings)
        out = build_out(build)
    if not created:
        response.status_code = status.HTTP_200_OK
        return out
    enqueue(ctx, build.job_id)
    response.headers["Location"] = f"/v1/builds/{build.job_id}"
    return out


@router.get("/builds/{build_id}", response_model=BuildOut, responses=BUILD_NOT_FOUND)
def read_build(build_id: uuid.UUID, ctx: ContextDep, token_id: TokenDep) -> dict:
    """State, progress, the reason it failed, and once built its artifact (id, name, sha256, size)."""
    with ctx.sessions() as session:
        return build_out(load_build(session, token_id, build_id))


@router.get("/builds/{build_id}/log", response_model=list[LogLine], responses=BUILD_NOT_FOUND)
def read_build_log(build_id: uuid.UUID, ctx: ContextDep, token_id: TokenDep,
                   after: LogOffset = 0
                   ) -> list[models.JobLogRecord]:
    with ctx.sessions() as session:
        load_build(session, token_id, build_id)
        return list(session.scalars(select(models.JobLogRecord).where(models.JobLogRecord.job_id == build_id)
                                    .order_by(models.JobLogRecord.id).offset(after)))


@router.post("/builds/{build_id}/cancel", response_model=BuildOut, status_code=status.HTTP_202_ACCEPTED,
             responses={**BUILD_NOT_FOUND, 409: {"description": "The build already finished."}})
def cancel_build(build_id: uuid.UUID, ctx: ContextDep, token_id: TokenDep) -> dict:
    """Cancel a queued build now, or ask a running one to stop."""
    with transaction(ctx.sessions) as session:
        build = load_build(session, token_id, build_id)
        try:
            jobs.cancel(session, build.job)
        except jobs.StateConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
        return build_out(build)

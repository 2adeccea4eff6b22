"""Artifacts (profiles, configurations, and later quantized models): list a job's, download one."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, HTTPException, status
from fastapi.responses import FileResponse
from sqlalchemy import select

from service import models
from service.api.deps import ContextDep, TokenDep
from service.api.jobs import load_job
from service.schemas import ArtifactOut

router = APIRouter(tags=["artifacts"])


@router.get("/jobs/{job_id}/artifacts", response_model=list[ArtifactOut])
def list_artifacts(job_id: uuid.UUID, ctx: ContextDep, token_id: TokenDep) -> list[models.Artifact]:
    with ctx.sessions() as session:
        load_job(session, token_id, job_id)
        return list(session.scalars(select(models.Artifact).where(models.Artifact.job_id == job_id)
                                    .order_by(models.Artifact.created_at)))


@router.get("/artifacts/{artifact_id}", response_class=FileResponse,
            responses={404: {"description": "No such artifact for this token."}})
def download_artifact(artifact_id: uuid.UUID, ctx: ContextDep, token_id: TokenDep) -> FileResponse:
    with ctx.sessions() as session:
        artifact = session.scalar(select(models.Artifact).where(models.Artifact.id == artifact_id,
                                                                models.Artifact.token_id == token_id))
    if artifact is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "artifact not found")
    path = ctx.storage.path(artifact.sha256)
    if not path.is_file():
        raise HTTPException(status.HTTP_410_GONE, "the artifact's bytes are no longer in storage")
    return FileResponse(path, media_type=artifact.media_type, filename=artifact.name,
                        headers={"X-Content-SHA256": artifact.sha256})

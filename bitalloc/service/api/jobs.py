"""Jobs: submit, list, read, cancel, delete; progress and log."""

from __future__ import annotations

import contextlib
import uuid
from typing import Annotated, Literal

from fastapi import APIRouter, Header, HTTPException, Query, Response, status
from fastapi.exceptions import RequestValidationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from bitalloc.pipeline.inputs import InputError, check_inputs
from bitalloc.service import garbage, jobs, shards
from bitalloc.service.api.deps import ContextDep, ListOffset, LogOffset, TokenDep
from bitalloc.service.context import Context
from bitalloc.service.db import transaction
from bitalloc.service.models import JobLogRecord, JobRecord
from bitalloc.service.schemas import JobCreate, JobList, JobOut, LogLine, Progress, ShardOut
from bitalloc.service.settings import Settings

router = APIRouter(prefix="/jobs", tags=["jobs"])

NOT_FOUND = {404: {"description": "No such job for this token."}}


def load_job(session: Session, token_id: int, job_id: uuid.UUID) -> JobRecord:
    """The token's job or a 404 (another token's job looks exactly like a missing one)."""
    job = jobs.get_job(session, token_id, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "job not found")
    return job


def check_paths(body: JobCreate, settings: Settings) -> None:
    """Hold every path the job would read to the operator's policy now (a 422 naming the field),
    so a token cannot make the service read any file; the worker holds it again."""
    try:
        check_inputs(body.to_spec(), settings.load_policy())
    except InputError as exc:
        raise RequestValidationError([{"type": "value_error", "loc": ("body", *exc.field.split(".")),
                                       "msg": str(exc), "input": None}]) from exc


@router.post("", status_code=status.HTTP_201_CREATED, response_model=JobOut,
             responses={400: {"description": "The body is not JSON text (e.g. not UTF-8)."},
                        422: {"description": "A field is invalid (loc names it), or the Idempotency-Key was used for another request."}})
def submit_job(
    body: JobCreate,
    ctx: ContextDep,
    token_id: TokenDep,
    response: Response,
    idempotency_key: Annotated[
        str | None,
        Header(
            min_length=1,
            max_length=255,
            pattern=r"^[\x21-\x7e]+$",
            description="Retries with the same key return the same job.",
        ),
    ] = None,
) -> JobRecord:
    """Queue a job. A retried request with the same ``Idempotency-Key`` returns the job it made."""
    check_paths(body, ctx.settings)
    try:
        with transaction(ctx.sessions) as session:
            job, created = jobs.submit(session, token_id, body, ctx.settings, idempotency_key)
    except jobs.IdempotencyMismatch as exc:
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("header", "Idempotency-Key"), "msg": str(exc), "input": idempotency_key}]
        ) from exc
    if not created:
        response.headers["Idempotent-Replayed"] = "true"
        resend(ctx, job)
        return job
    enqueue(ctx, job.id)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job


def resend(ctx: Context, job: JobRecord) -> None:
    """A replayed submission of a job still queued with no message (its first enqueue failed):
    send it now, not only at the reaper's next pass. Best effort: the reaper remains the guarantee."""
    if job.state != "queued":
        return
    with contextlib.suppress(Exception):
        ctx.queue.enqueue(job.id, job.attempts + 1)


def enqueue(ctx: Context, job_id: uuid.UUID) -> None:
    """Put a stored job on the queue. If the queue refuses, the job stays queued (the reaper sends
    it once the queue is back) and the answer is a 503 saying so: a retry with the same
    ``Idempotency-Key`` finds the job instead of making another."""
    try:
        ctx.queue.enqueue(job_id, 1)
    except Exception as exc:
        with transaction(ctx.sessions) as session:
            jobs.add_log(session, job_id, f"could not enqueue: {exc}; it is sent again when the queue is back",
                         "warning")
        raise HTTPException(status.HTTP_503_SERVICE_UNAVAILABLE,
                            f"the job queue is unavailable ({exc}); job {job_id} is stored and runs once the "
                            "queue is back") from exc


@router.get("", response_model=JobList)
def list_jobs(
    ctx: ContextDep,
    token_id: TokenDep,
    state: Literal["queued", "running", "succeeded", "failed", "canceled"] | None = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: ListOffset = 0,
) -> dict:
    """This token's jobs, newest first."""
    with ctx.sessions() as session:
        items, total = jobs.list_jobs(session, token_id, state, limit, offset)
    return {"items": [JobOut.model_validate(j) for j in items], "total": total, "limit": limit, "offset": offset}


@router.get("/{job_id}", response_model=JobOut, responses=NOT_FOUND)
def read_job(job_id: uuid.UUID, ctx: ContextDep, token_id: TokenDep) -> JobOut:
    """The job, with the progress of its shards when its profile is measured by several workers."""
    with ctx.sessions() as session:
        job = JobOut.model_validate(load_job(session, token_id, job_id))
        job.shards = [ShardOut.model_validate(s) for s in shards.states(session, job_id)]
    return job


@router.get("/{job_id}/progress", response_model=Progress, responses=NOT_FOUND)
def read_progress(job_id: uuid.UUID, ctx: ContextDep, token_id: TokenDep) -> dict:
    """Phase, unit i of n within it, and the overall percent."""
    with ctx.sessions() as session:
        return load_job(session, token_id, job_id).progress


@router.get("/{job_id}/log", response_model=list[LogLine], responses=NOT_FOUND)
def read_log(
    job_id: uuid.UUID,
    ctx: ContextDep,
    token_id: TokenDep,
    after: LogOffset = 0,
) -> list[JobLogRecord]:
    with ctx.sessions() as session:
        load_job(session, token_id, job_id)
        return list(
            session.scalars(
                select(JobLogRecord).where(JobLogRecord.job_id == job_id).order_by(JobLogRecord.id).offset(after)
            )
        )


@router.post(
    "/{job_id}/cancel",
    response_model=JobOut,
    status_code=status.HTTP_202_ACCEPTED,
    responses={**NOT_FOUND, 409: {"description": "The job already finished."}},
)
def cancel_job(job_id: uuid.UUID, ctx: ContextDep, token_id: TokenDep) -> JobRecord:
    """Cancel a queued job now, or ask a running one to stop (it stops at its next progress report)."""
    with transaction(ctx.sessions) as session:
        try:
            return jobs.cancel(session, load_job(session, token_id, job_id))
        except jobs.StateConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc


@router.delete(
    "/{job_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    responses={**NOT_FOUND, 409: {"description": "The job is running: cancel it first."}},
)
def delete_job(job_id: uuid.UUID, ctx: ContextDep, token_id: TokenDep) -> None:
    """Delete a job and its front, allocations, log, builds and artifact records; then, once that
    committed, the stored files no other job's artifact (nor a cached profile) shares."""
    with transaction(ctx.sessions) as session:
        try:
            candidates = jobs.delete(session, load_job(session, token_id, job_id))
        except jobs.StateConflict as exc:
            raise HTTPException(status.HTTP_409_CONFLICT, str(exc)) from exc
    garbage.after_delete(ctx.sessions, ctx.storage, candidates)

"""A job's lifecycle in the database: submit, claim, heartbeat, finish, cancel, reap.

States: ``queued -> running -> succeeded | failed | canceled`` (and ``running -> queued``
when a worker is lost and the job is retried). Every transition is a compare-and-set
(``UPDATE ... WHERE state = ... [AND lease_owner = ...]``), so two workers, a worker and the
reaper, or two API replicas can race and exactly one of them wins. The lifecycle is the same
for every kind of job; what the API calls a job is a ``compress`` job (builds of a point's
artifact, kind ``artifact``, are read through ``service.builds``).
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete as delete_rows
from sqlalchemy import exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from bitalloc.pipeline.spec import JobSpec
from bitalloc.service.models import (
    FINISHED_STATES,
    ArtifactRecord,
    BuildRecord,
    JobLogRecord,
    JobRecord,
    ShardRecord,
    utcnow,
)
from bitalloc.service.schemas import JobCreate
from bitalloc.service.settings import Settings


class IdempotencyMismatch(ValueError):
    """An idempotency key reused for a different request."""


class StateConflict(ValueError):
    """The job is in a state that does not allow the operation."""


def request_hash(request: JobCreate) -> str:
    return hashlib.sha256(json.dumps(request.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def submit(session: Session, token_id: int, request: JobCreate, settings: Settings,
           idempotency_key: str | None = None) -> tuple[JobRecord, bool]:
    """Store a new queued job, or return the one this token already made with this key.

    Returns ``(job, created)``. Two concurrent submissions with one key both try to insert;
    the unique constraint lets one win and the other returns the winner's job. The job keeps the
    request as submitted (``spec``: what the API shows, what its hash covers) and, apart from it,
    the pipeline's spec it will run (``run_spec``).
    """
    digest = request_hash(request)
    if idempotency_key is not None:
        existing = _by_key(session, token_id, idempotency_key)
        if existing is not None:
            return _same_request(existing, digest), False
    job = JobRecord(token_id=token_id, idempotency_key=idempotency_key, request_hash=digest, state="queued",
              spec=request.model_dump(mode="json"), run_spec=request.to_spec().to_dict(), progress={},
              max_attempts=settings.max_attempts, timeout_seconds=settings.job_timeout)
    try:
        with session.begin_nested():
            session.add(job)
    except IntegrityError:
        if idempotency_key is None:
            raise
        existing = _by_key(session, token_id, idempotency_key)
        if existing is None:
            raise
        return _same_request(existing, digest), False
    add_log(session, job.id, "queued")
    return job, True


def _by_key(session: Session, token_id: int, key: str) -> JobRecord | None:
    return session.scalar(select(JobRecord).where(JobRecord.token_id == token_id, JobRecord.idempotency_key == key))


def _same_request(job: JobRecord, digest: str) -> JobRecord:
    if job.request_hash != digest:
        raise IdempotencyMismatch("this Idempotency-Key was already used for a different request")
    return job


def job_spec(job: JobRecord) -> JobSpec:
    """The pipeline's spec a compress job runs: the one stored when the API accepted it, so a
    schema that has since tightened cannot refuse (or reinterpret) a job it already took."""
    if job.run_spec is None:
        raise ValueError(f"job {job.id} was submitted before jobs kept the spec they run, and its request could "
                         f"not be converted: submit it again")
    return JobSpec.from_dict(job.run_spec)


def get_job(session: Session, token_id: int, job_id: uuid.UUID) -> JobRecord | None:
    """The token's job, or None: another token's job is indistinguishable from a missing one."""
    return session.scalar(
        select(JobRecord).where(JobRecord.id == job_id, JobRecord.token_id == token_id, JobRecord.kind == "compress")
    )


def list_jobs(
    session: Session, token_id: int, state: str | None, limit: int, offset: int
) -> tuple[list[JobRecord], int]:
    where = [JobRecord.token_id == token_id, JobRecord.kind == "compress"] + (
        [JobRecord.state == state] if state else []
    )
    total = session.scalar(select(func.count()).select_from(JobRecord).where(*where)) or 0
    rows = session.scalars(
        select(JobRecord).where(*where).order_by(JobRecord.created_at.desc(), JobRecord.id).limit(limit).offset(offset)
    )
    return list(rows), total


def add_log(session: Session, job_id: uuid.UUID, message: str, level: str = "info") -> None:
    session.add(JobLogRecord(job_id=job_id, message=message, level=level))


def cancel(session: Session, job: JobRecord) -> JobRecord:
    """A queued job is canceled at once; a running one is asked to stop (its worker sees the
    request at its next progress report or heartbeat and stops)."""
    if job.state in FINISHED_STATES:
        raise StateConflict(f"job is already {job.state}")
    now = utcnow()
    done = session.execute(
        update(JobRecord)
        .where(JobRecord.id == job.id, JobRecord.state == "queued")
        .values(state="canceled", finished_at=now, error="canceled by request")
    )
    if done.rowcount:
        add_log(session, job.id, "canceled while queued")
    else:
        session.execute(
            update(JobRecord).where(JobRecord.id == job.id, JobRecord.state == "running").values(cancel_requested=True)
        )
        add_log(session, job.id, "cancel requested")
    session.refresh(job)
    return job


def waiting(session: Session, older_than: datetime, limit: int = 100) -> list[tuple[uuid.UUID, int]]:
    """Queued jobs made before ``older_than``, oldest first, as ``(job_id, next_attempt)``: the
    ones whose queue message the reconciler checks."""
    rows = session.execute(select(JobRecord.id, JobRecord.attempts)
                           .where(JobRecord.state == "queued", JobRecord.created_at < older_than)
                           .order_by(JobRecord.created_at).limit(limit))
    return [(job_id, attempts + 1) for job_id, attempts in rows]


def delete(session: Session, job: JobRecord) -> set[str]:
    """Delete a job with its front, allocations, log, artifact records, builds and shards (not
    while it or one of its builds runs).

    Returns the sha256 of the artifact records and shard blobs it deleted. Their bytes stay in the store: the
    caller hands them to ``service.garbage.after_delete`` once this transaction has committed,
    so a rollback never leaves a row pointing at a missing file.
    """
    if job.state == "running":
        raise StateConflict("job is running: cancel it first")
    builds = select(BuildRecord.job_id).where(BuildRecord.parent_id == job.id)
    if session.scalar(select(exists().where(JobRecord.id.in_(builds), JobRecord.state == "running"))):
        raise StateConflict("a build of this job is running: cancel it first")
    owners = or_(ArtifactRecord.job_id == job.id, ArtifactRecord.job_id.in_(builds))
    candidates = set(session.scalars(select(ArtifactRecord.sha256).where(owners)))
    shards = session.execute(select(ShardRecord.job_id, ShardRecord.inputs_sha256, ShardRecord.rows_sha256)
                             .where(ShardRecord.parent_id == job.id)).all()
    candidates |= {sha for _, *blobs in shards for sha in blobs if sha is not None}
    # A build's or a shard's job row is not a child of the parent's in the schema, so it goes explicitly.
    session.execute(delete_rows(JobRecord).where(JobRecord.id.in_(builds)))
    session.execute(delete_rows(JobRecord).where(JobRecord.id.in_([job_id for job_id, *_ in shards])))
    session.delete(job)
    return candidates


def claim(session: Session, job_id: uuid.UUID, owner: str, lease_seconds: float) -> JobRecord | None:
    """Start an attempt at a queued job under a fresh lease; None if it is not queued any more."""
    job = session.get(JobRecord, job_id)
    if job is None or job.state != "queued":
        return None
    now = utcnow()
    won = session.execute(
        update(JobRecord)
        .where(JobRecord.id == job_id, JobRecord.state == "queued")
        .values(
            state="running",
            lease_owner=owner,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            deadline_at=now + timedelta(seconds=job.timeout_seconds),
            attempts=JobRecord.attempts + 1,
            started_at=now,
            progress={},
            error=None,
        )
    )
    if not won.rowcount:
        return None
    session.refresh(job)
    return job


def claim_next(session: Session, owner: str, lease_seconds: float) -> JobRecord | None:
    """The oldest queued job, claimed (the embedded worker's dequeue)."""
    candidates = session.scalars(
        select(JobRecord.id).where(JobRecord.state == "queued").order_by(JobRecord.created_at).limit(8)
    )
    for job_id in list(candidates):
        job = claim(session, job_id, owner, lease_seconds)
        if job is not None:
            return job
    return None


@dataclass(frozen=True)
class Beat:
    alive: bool
    cancel_requested: bool


def beat(session: Session, job_id: uuid.UUID, owner: str, lease_seconds: float, progress: dict | None = None) -> Beat:
    """Renew the lease (and store progress); tells the worker whether it still owns the job
    and whether someone asked to cancel it."""
    values: dict = {"lease_expires_at": utcnow() + timedelta(seconds=lease_seconds)}
    if progress is not None:
        values["progress"] = progress
    renewed = session.execute(
        update(JobRecord)
        .where(JobRecord.id == job_id, JobRecord.lease_owner == owner, JobRecord.state == "running")
        .values(**values)
    )
    if not renewed.rowcount:
        return Beat(alive=False, cancel_requested=False)
    return Beat(
        alive=True,
        cancel_requested=bool(session.scalar(select(JobRecord.cancel_requested).where(JobRecord.id == job_id))),
    )


def finish(
    session: Session,
    job_id: uuid.UUID,
    owner: str,
    state: str,
    *,
    error: str | None = None,
    progress: dict | None = None,
    result: dict | None = None,
    profile_id: int | None = None,
) -> bool:
    """End the attempt this worker owns; False when it no longer owns it (or, for success,
    when a cancel was requested meanwhile: the caller then finishes it as canceled)."""
    job = session.get(JobRecord, job_id)
    if job is None:
        return False
    now = utcnow()
    where = [JobRecord.id == job_id, JobRecord.lease_owner == owner, JobRecord.state == "running"]
    if state == "succeeded":
        where.append(JobRecord.cancel_requested.is_(False))
    values: dict = {
        "state": state,
        "error": error,
        "finished_at": now,
        "lease_owner": None,
        "lease_expires_at": None,
        "seconds": _seconds(job.started_at, now),
        "result": result,
        "profile_id": profile_id,
    }
    if progress is not None:
        values["progress"] = progress
    done = session.execute(update(JobRecord).where(*where).values(**values))
    return bool(done.rowcount)


def release(session: Session, job_id: uuid.UUID, owner: str) -> bool:
    """Hand a running job back to the queue without counting the attempt (a worker shutting down)."""
    done = session.execute(
        update(JobRecord)
        .where(JobRecord.id == job_id, JobRecord.lease_owner == owner, JobRecord.state == "running")
        .values(state="queued", lease_owner=None, lease_expires_at=None, attempts=JobRecord.attempts - 1)
    )
    return bool(done.rowcount)


def _seconds(start: datetime | None, end: datetime) -> float | None:
    return None if start is None else round((end - start).total_seconds(), 3)


def reap(session: Session) -> list[tuple[uuid.UUID, int]]:
    """Settle running jobs whose worker is gone (lease expired) or that ran past their deadline.

    A lost job is queued again while it has attempts left and failed with the reason
    otherwise; an overdue one is failed as timed out. Returns ``(job_id, next_attempt)`` of
    the requeued jobs, for the caller to enqueue once this transaction commits.
    """
    now = utcnow()
    stuck = session.scalars(
        select(JobRecord).where(
            JobRecord.state == "running", (JobRecord.lease_expires_at < now) | (JobRecord.deadline_at < now)
        )
    )
    requeued = []
    for job in list(stuck):
        values: dict = {"lease_owner": None, "lease_expires_at": None}
        if job.deadline_at is not None and job.deadline_at < now:
            reason = f"timed out: still running {job.timeout_seconds:g} s after it started (job_timeout)"
            values.update(state="failed", error=reason, finished_at=now, seconds=_seconds(job.started_at, now))
        elif job.cancel_requested:
            reason = "canceled by request (its worker stopped responding)"
            values.update(state="canceled", error=reason, finished_at=now, seconds=_seconds(job.started_at, now))
        elif job.attempts < job.max_attempts:
            reason = (
                f"worker lost: no heartbeat since its lease expired at {job.lease_expires_at:%Y-%m-%dT%H:%M:%SZ}; "
                f"retrying (attempt {job.attempts + 1} of {job.max_attempts})"
            )
            values.update(state="queued", progress={})
        else:
            reason = (
                f"worker lost: no heartbeat since its lease expired at {job.lease_expires_at:%Y-%m-%dT%H:%M:%SZ}, "
                f"on attempt {job.attempts} of {job.max_attempts}"
            )
            values.update(state="failed", error=reason, finished_at=now, seconds=_seconds(job.started_at, now))
        won = session.execute(
            update(JobRecord)
            .where(JobRecord.id == job.id, JobRecord.state == "running", JobRecord.lease_owner == job.lease_owner)
            .values(**values)
        )
        if won.rowcount:
            add_log(session, job.id, reason, level="warning" if values["state"] == "queued" else "error")
            if values["state"] == "queued":
                requeued.append((job.id, job.attempts + 1))
    return requeued

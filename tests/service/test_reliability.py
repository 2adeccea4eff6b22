"""What must hold when things go wrong or many things happen at once: dead workers, timeouts,
crashes while storing, duplicate and concurrent submissions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from rq import SimpleWorker
from service_helpers import bearer, job_body, running_app, uvicorn_server
from sqlalchemy import func, null, select, update

from bitalloc.service import executor, jobs, reaper, results, worker
from bitalloc.service.app import create_app
from bitalloc.service.context import Context
from bitalloc.service.db import transaction
from bitalloc.service.models import AllocationRecord, FrontRecord, JobRecord, TokenRecord, utcnow
from bitalloc.service.schemas import JobCreate
from bitalloc.service.settings import Settings


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def ctx(request, tmp_path):
    """A context on each database (no Redis: these tests drive the lifecycle directly)."""
    url = None if request.param == "sqlite" else request.getfixturevalue("pg_url")
    context = Context.create(Settings(data_dir=tmp_path / "data", database_url=url, max_attempts=2, job_timeout=600))
    yield context
    context.close()


def queued_job(ctx: Context, **overrides) -> uuid.UUID:
    with transaction(ctx.sessions) as session:
        token_id = _token(session)
        job, _ = jobs.submit(session, token_id, JobCreate.model_validate(job_body(**overrides)), ctx.settings)
        return job.id


def _token(session) -> int:
    from bitalloc.service.auth import create_token

    return create_token(session, "t")[0].id


def expire_lease(ctx: Context, job_id: uuid.UUID, **values) -> None:
    with transaction(ctx.sessions) as session:
        session.execute(
            update(JobRecord)
            .where(JobRecord.id == job_id)
            .values(lease_expires_at=utcnow() - timedelta(seconds=1), **values)
        )


def job_row(ctx: Context, job_id: uuid.UUID) -> JobRecord:
    with ctx.sessions() as session:
        return session.get(JobRecord, job_id)


def test_a_lost_worker_is_retried_then_failed_with_the_reason_and_fenced_out(ctx):
    job_id = queued_job(ctx)
    for attempt in (1, 2):
        with transaction(ctx.sessions) as session:
            assert jobs.claim(session, job_id, f"worker-{attempt}", lease_seconds=60).attempts == attempt
        expire_lease(ctx, job_id)
        with transaction(ctx.sessions) as session:
            requeued = jobs.reap(session)
        job = job_row(ctx, job_id)
        if attempt == 1:
            assert requeued == [(job_id, 2)] and job.state == "queued" and job.lease_owner is None
        else:
            assert requeued == [] and job.state == "failed"
            assert "worker lost" in job.error and "attempt 2 of 2" in job.error
    with transaction(ctx.sessions) as session:
        assert not jobs.beat(session, job_id, "worker-2", 60).alive
        assert not jobs.finish(session, job_id, "worker-2", "succeeded")
    assert job_row(ctx, job_id).state == "failed"


def test_an_overdue_job_is_failed_as_timed_out_and_a_live_lease_is_left_alone(ctx):
    overdue, healthy = queued_job(ctx), queued_job(ctx, points=7)
    with transaction(ctx.sessions) as session:
        jobs.claim(session, overdue, "w1", lease_seconds=60)
        jobs.claim(session, healthy, "w2", lease_seconds=60)
        session.execute(
            update(JobRecord).where(JobRecord.id == overdue).values(deadline_at=utcnow() - timedelta(seconds=1))
        )
    with transaction(ctx.sessions) as session:
        assert jobs.reap(session) == []
    assert job_row(ctx, overdue).state == "failed" and "timed out" in job_row(ctx, overdue).error
    assert job_row(ctx, healthy).state == "running"
    with transaction(ctx.sessions) as session:
        assert jobs.beat(session, healthy, "w2", 60) == jobs.Beat(alive=True, cancel_requested=False)


def test_a_job_past_its_timeout_fails_and_a_stopping_worker_hands_its_job_back(ctx):
    slow, interrupted = queued_job(ctx), queued_job(ctx, points=7)
    with transaction(ctx.sessions) as session:
        session.execute(update(JobRecord).where(JobRecord.id == slow).values(timeout_seconds=0.001))
    assert executor.Executor(ctx).run(slow) == "failed"
    assert job_row(ctx, slow).error == "timed out: still running 0.001 s after it started (job_timeout)"
    stopping = threading.Event()
    stopping.set()
    assert executor.Executor(ctx, stopping).run(interrupted) == "queued"
    job = job_row(ctx, interrupted)
    assert job.state == "queued" and job.attempts == 0 and job.lease_owner is None


def test_two_workers_racing_for_one_job_claim_it_once(ctx):
    job_id = queued_job(ctx)
    with transaction(ctx.sessions) as session:
        assert jobs.claim(session, job_id, "a", 60) is not None
    with transaction(ctx.sessions) as session:
        assert jobs.claim(session, job_id, "b", 60) is None
        other = jobs.claim_next(session, "b", 60)  # the shared PostgreSQL schema may hold other tests' jobs
        assert other is None or other.id != job_id


def test_a_job_runs_the_spec_it_was_accepted_with_even_if_the_schema_now_refuses_its_request(ctx, zoo):
    """The worker runs the stored ``run_spec``: a request that today's schema would refuse (a field since
    removed, a range since tightened) neither fails the job nor changes what it computes."""
    job_id = queued_job(ctx)
    refused = {**job_body(), "colour": "blue", "points": 1}
    with pytest.raises(ValueError):
        JobCreate.model_validate(refused)
    with transaction(ctx.sessions) as session:
        session.execute(update(JobRecord).where(JobRecord.id == job_id).values(spec=refused))
    assert executor.Executor(ctx).run(job_id) == "succeeded", job_row(ctx, job_id).error
    job = job_row(ctx, job_id)
    assert job.spec == refused and job.run_spec["points"] == 6


def test_a_job_without_a_stored_run_spec_fails_asking_to_be_submitted_again(ctx):
    job_id = queued_job(ctx)
    with transaction(ctx.sessions) as session:  # as migration 0005 leaves a request it cannot read
        session.execute(update(JobRecord).where(JobRecord.id == job_id).values(run_spec=null()))
    assert executor.Executor(ctx).run(job_id) == "failed"
    job = job_row(ctx, job_id)
    assert job.error == (f"job {job_id} was submitted before jobs kept the spec they run, and its request could not "
                         f"be converted: submit it again")


def test_a_crash_while_storing_results_leaves_no_half_written_front(ctx, monkeypatch, zoo):
    job_id = queued_job(ctx)
    real, calls = results.allocation_row, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return real(*args)

    monkeypatch.setattr(results, "allocation_row", flaky)
    assert executor.Executor(ctx).run(job_id) == "failed"
    job = job_row(ctx, job_id)
    assert job.state == "failed" and "while storing results: OSError: disk full" in job.error
    with ctx.sessions() as session:
        assert session.scalar(select(func.count()).select_from(FrontRecord).where(FrontRecord.job_id == job_id)) == 0
        assert (
            session.scalar(select(func.count()).select_from(AllocationRecord).where(AllocationRecord.job_id == job_id))
            == 0
        )


@pytest.mark.integration
@pytest.mark.slow
def test_a_killed_worker_process_leaves_its_job_retried_not_stuck(queued_settings, own_pg_url, monkeypatch, zoo):
    settings = queued_settings.model_copy(update={"lease_seconds": 2.0, "database_url": own_pg_url})
    with running_app(settings) as (client, ctx):
        headers = bearer(ctx)
        job_id = client.post("/v1/jobs", json=job_body(), headers=headers).json()["id"]
        env = {
            **os.environ,
            "BITALLOC_DATABASE_URL": settings.database_url,
            "BITALLOC_REDIS_URL": settings.redis_url,
            "BITALLOC_QUEUE_NAME": settings.queue_name,
            "BITALLOC_DATA_DIR": str(settings.data_dir),
            "BITALLOC_LEASE_SECONDS": "2",
            "BITALLOC_HEARTBEAT_SECONDS": "0.3",
            "BITALLOC_AUTO_MIGRATE": "0",
        }
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "bitalloc"), "worker", "--burst"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 90
            while job_row(ctx, uuid.UUID(job_id)).state == "queued":
                assert process.poll() is None and time.monotonic() < deadline, "the worker never started the job"
                time.sleep(0.05)
        finally:
            for pid in [process.pid, *descendants(process.pid)]:  # the worker and its work horse, mid-job
                os.kill(pid, signal.SIGKILL)
            process.wait()
        assert job_row(ctx, uuid.UUID(job_id)).state == "running"
        time.sleep(2.5)  # its lease runs out: nobody renews it
        assert reaper.Reaper(ctx).reap_once() == [uuid.UUID(job_id)]
        assert client.get(f"/v1/jobs/{job_id}", headers=headers).json()["state"] == "queued"

        monkeypatch.setitem(worker._contexts, os.getpid(), ctx)
        SimpleWorker([ctx.queue.rq], connection=ctx.queue.redis).work(burst=True)
        job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        assert job["state"] == "succeeded" and job["attempts"] == 2
        log = [line["message"] for line in client.get(f"/v1/jobs/{job_id}/log", headers=headers).json()]
        assert any(m.startswith("worker lost") and "retrying (attempt 2 of 3)" in m for m in log)


def descendants(pid: int) -> list[int]:
    """Child processes, recursively (an RQ work horse runs in a session of its own, so a
    process-group kill would miss it)."""
    children = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        children += [int(c) for c in (task / "children").read_text().split()]
    return children + [d for c in children for d in descendants(c)]


def submit_many(base_url: str, headers: dict, bodies: list[dict], keys: list[str | None]) -> list[httpx.Response]:
    def post(item):
        body, key = item
        with httpx.Client(base_url=base_url, timeout=60) as client:
            return client.post("/v1/jobs", json=body, headers={**headers, **({"Idempotency-Key": key} if key else {})})

    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        return list(pool.map(post, zip(bodies, keys)))


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql+redis", marks=pytest.mark.integration)])
def test_fifty_concurrent_submissions_are_all_stored_and_a_duplicated_key_makes_one_job(backend, tmp_path, request):
    if backend == "sqlite":
        settings = Settings(data_dir=tmp_path / "data", worker_threads=0, reaper_seconds=3600)
    else:
        settings = Settings(
            data_dir=tmp_path / "data",
            database_url=request.getfixturevalue("pg_url"),
            redis_url=request.getfixturevalue("redis_url"),
            queue_name=request.getfixturevalue("queue_name"),
            reaper_seconds=3600,
        )
    app = create_app(settings)
    ctx = app.state.ctx
    headers = bearer(ctx, f"load-{backend}")
    with uvicorn_server(app) as base_url:
        responses = submit_many(base_url, headers, [job_body(points=2 + i) for i in range(50)], [None] * 50)
        assert [r.status_code for r in responses] == [201] * 50
        ids = {r.json()["id"] for r in responses}
        duplicates = submit_many(base_url, headers, [job_body()] * 10, ["same-key"] * 10)
        assert [r.status_code for r in duplicates] == [201] * 10
        assert len({r.json()["id"] for r in duplicates}) == 1
        listed = httpx.get(f"{base_url}/v1/jobs?limit=500", headers=headers).json()
    assert len(ids) == 50 and listed["total"] == 51
    assert ids | {duplicates[0].json()["id"]} == {j["id"] for j in listed["items"]}
    with ctx.sessions() as session:
        specs = session.scalars(select(JobRecord.spec).join(TokenRecord).where(TokenRecord.name == f"load-{backend}"))
        points = sorted(spec["points"] for spec in specs)
    assert points == sorted([*range(2, 52), 6])
    if not ctx.embedded:
        assert ctx.queue.rq.count == 51  # every job reached the queue, the duplicate once
    ctx.close()


def test_a_failure_reason_never_carries_more_than_its_first_line():
    from bitalloc.service.executor import REASON_CHARS, public_reason

    listing = "no files match\n" + "\n".join(f"/srv/data/private-{i}.csv: secret row" for i in range(50))
    assert public_reason(listing) == "no files match [...]"
    assert public_reason("x" * 5000) == "x" * REASON_CHARS + " [...]"
    assert public_reason("budget 1.0 is below the smallest achievable 2.1") == "budget 1.0 is below the smallest achievable 2.1"

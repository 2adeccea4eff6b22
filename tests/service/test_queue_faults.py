"""A job stored as queued is always eventually run, once: the API dying between its commit and
the enqueue, Redis losing its messages, and Redis going down under a running worker, each
injected for real against PostgreSQL and Redis."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from redis import Redis
from rq import SimpleWorker
from rq.job import Job
from service_helpers import bearer, job_body, running_app, wait_until_finished
from sqlalchemy import update
from test_reliability import descendants

from bitalloc.service import jobs, worker
from bitalloc.service.db import transaction
from bitalloc.service.models import JobRecord, utcnow
from bitalloc.service.reaper import Reaper
from bitalloc.service.schemas import JobCreate


def store_without_enqueue(ctx, count: int) -> list[uuid.UUID]:
    """Jobs committed as queued with no queue message: what an API killed right after its commit leaves."""
    from bitalloc.service.auth import create_token

    with transaction(ctx.sessions) as session:
        token_id = create_token(session, "t")[0].id
        return [jobs.submit(session, token_id, JobCreate.model_validate(job_body(points=4 + i)), ctx.settings)[0].id
                for i in range(count)]


def run_queue(ctx, monkeypatch) -> None:
    monkeypatch.setitem(worker._contexts, os.getpid(), ctx)
    SimpleWorker([ctx.queue.rq], connection=ctx.queue.redis).work(burst=True)


def states(ctx, job_ids) -> list[tuple[str, int]]:
    with ctx.sessions() as session:
        return [(job.state, job.attempts) for job in (session.get(JobRecord, j) for j in job_ids)]


@pytest.mark.integration
@pytest.mark.slow
def test_jobs_an_api_left_unsent_are_sent_once_after_the_grace_period(queued_settings, monkeypatch, zoo):
    with running_app(queued_settings.model_copy(update={"requeue_seconds": 60.0})) as (_, ctx):
        stranded = store_without_enqueue(ctx, 2)
        assert not any(ctx.queue.pending(j, 1) for j in stranded)
        reaper = Reaper(ctx)
        assert reaper.reconcile_once() == []  # within the grace period the API may still be sending them
        with transaction(ctx.sessions) as session:  # a minute later
            session.execute(update(JobRecord).where(JobRecord.id.in_(stranded))
                            .values(created_at=utcnow() - timedelta(seconds=61)))
        assert sorted(reaper.reconcile_once()) == sorted(stranded)
        assert reaper.reconcile_once() == []  # their messages are pending now: not sent twice
        run_queue(ctx, monkeypatch)
        assert states(ctx, stranded) == [("succeeded", 1), ("succeeded", 1)]


@pytest.mark.integration
@pytest.mark.slow
def test_jobs_whose_messages_redis_lost_are_sent_again_and_run_once(queued_settings, monkeypatch, zoo):
    settings = queued_settings.model_copy(update={"requeue_seconds": 0.0})
    with running_app(settings) as (client, ctx):
        headers = bearer(ctx)
        ids = [uuid.UUID(client.post("/v1/jobs", json=job_body(points=4 + i), headers=headers).json()["id"])
               for i in range(3)]
        assert all(ctx.queue.pending(j, 1) for j in ids)
        for j in ids:  # Redis loses the messages (a restart without persistence, a flush)
            Job.fetch(ctx.queue.message_id(j, 1), connection=ctx.queue.redis).delete(remove_from_queue=True)
        assert not any(ctx.queue.pending(j, 1) for j in ids) and ctx.queue.rq.count == 0
        assert sorted(Reaper(ctx).reconcile_once()) == sorted(ids)
        run_queue(ctx, monkeypatch)
        assert states(ctx, ids) == [("succeeded", 1)] * 3
        for j in ids:
            log = [line["message"] for line in client.get(f"/v1/jobs/{j}/log", headers=headers).json()]
            assert "queued again: no queue message held this job" in log
            assert sum(m.startswith("succeeded") for m in log) == 1


@pytest.mark.integration
def test_senders_racing_on_one_job_put_one_message_on_the_queue(redis_url, queue_name):
    """The submitting request, a replayed submission and the reaper can all find a job unsent at once."""
    from concurrent.futures import ThreadPoolExecutor

    from bitalloc.service.queue import RQQueue

    queue = RQQueue(redis_url, queue_name, job_timeout=60)
    job_id = uuid.uuid4()
    try:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda _: queue.enqueue(job_id, 1), range(32)))
        assert queue.rq.count == 1 and queue.pending(job_id, 1)
        queue.enqueue(job_id, 2)  # the next attempt is a message of its own
        assert queue.rq.count == 2
    finally:
        queue.rq.empty()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_redis(port: int, folder: Path) -> subprocess.Popen:
    """A Redis of this test's own (no persistence: a restart loses every message)."""
    process = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no", "--dir", str(folder)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            Redis(port=port).ping()
            return process
        except Exception:
            time.sleep(0.05)
    process.kill()
    raise RuntimeError("redis-server did not start")


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server to stop and start")
def test_a_worker_rides_out_a_redis_outage_and_every_job_succeeds_once(queued_settings, own_pg_url, tmp_path, zoo):
    port = free_port()
    redis = start_redis(port, tmp_path)
    settings = queued_settings.model_copy(update={
        "redis_url": f"redis://127.0.0.1:{port}/0", "database_url": own_pg_url, "reaper_seconds": 0.5,
        "requeue_seconds": 2.0})
    env = {**os.environ, "BITALLOC_DATABASE_URL": own_pg_url, "BITALLOC_REDIS_URL": settings.redis_url,
           "BITALLOC_QUEUE_NAME": settings.queue_name, "BITALLOC_DATA_DIR": str(settings.data_dir),
           "BITALLOC_REAPER_SECONDS": "0.5", "BITALLOC_REQUEUE_SECONDS": "2", "BITALLOC_HEARTBEAT_SECONDS": "0.3",
           "BITALLOC_AUTO_MIGRATE": "0"}
    process = None
    try:
        with running_app(settings) as (client, ctx):
            headers = bearer(ctx)
            process = subprocess.Popen([str(Path(sys.executable).parent / "bitalloc"), "worker"], env=env,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ids = [client.post("/v1/jobs", json=job_body(points=4 + i), headers=headers).json()["id"]
                   for i in range(3)]
            deadline = time.monotonic() + 90
            while client.get(f"/v1/jobs/{ids[0]}", headers=headers).json()["state"] == "queued":
                assert time.monotonic() < deadline, "the worker never started a job"
                time.sleep(0.05)
            redis.terminate()  # down for 5 s, mid-job, and back empty
            redis.wait()
            time.sleep(5)
            redis = start_redis(port, tmp_path)
            finished = [wait_until_finished(client, headers, j, timeout=240) for j in ids]
            assert process.poll() is None, "the worker died with Redis"
            assert [(job["state"], job["attempts"]) for job in finished] == [("succeeded", 1)] * 3
    finally:
        if process is not None:
            process.kill()
            process.wait()
        redis.kill()
        redis.wait()


def test_the_worker_waits_longer_each_time_until_redis_answers():
    waits, answers = [], iter([ConnectionError, ConnectionError, ConnectionError, None])

    def ping():
        error = next(answers)
        if error is not None:
            raise error("down")

    worker.wait_for_redis(ping, (ConnectionError,), sleep=waits.append)
    assert waits == [0.5, 1.0, 2.0, 4.0]


@pytest.mark.integration
@pytest.mark.slow
def test_worker_count_runs_jobs_side_by_side(queued_settings, own_pg_url, zoo):
    """``bitalloc worker --count 2``: two processes wait on the queue, so two jobs run at once
    (their running intervals overlap), and both succeed once."""
    from rq import Worker

    settings = queued_settings.model_copy(update={"database_url": own_pg_url})
    env = {**os.environ, "BITALLOC_DATABASE_URL": own_pg_url, "BITALLOC_REDIS_URL": settings.redis_url,
           "BITALLOC_QUEUE_NAME": settings.queue_name, "BITALLOC_DATA_DIR": str(settings.data_dir),
           "BITALLOC_AUTO_MIGRATE": "0"}
    process = subprocess.Popen([str(Path(sys.executable).parent / "bitalloc"), "worker", "--count", "2"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        with running_app(settings) as (client, ctx):
            deadline = time.monotonic() + 120
            while len(Worker.all(queue=ctx.queue.rq)) < 2:  # both processes are waiting on the queue
                assert process.poll() is None and time.monotonic() < deadline, "two workers never registered"
                time.sleep(0.1)
            headers = bearer(ctx)
            ids = [client.post("/v1/jobs", json=job_body(points=4 + i), headers=headers).json()["id"] for i in range(2)]
            finished = [wait_until_finished(client, headers, j, timeout=180) for j in ids]
            children = descendants(process.pid)
            assert len(children) >= 2
    finally:
        process.terminate()
        process.wait(timeout=60)
    deadline = time.monotonic() + 15  # multiprocessing's resource tracker leaves once the parent is gone
    while [pid for pid in children if Path(f"/proc/{pid}").exists()]:
        assert time.monotonic() < deadline, "a worker outlived its parent's SIGTERM"
        time.sleep(0.1)
    assert [(job["state"], job["attempts"]) for job in finished] == [("succeeded", 1)] * 2
    (a_start, a_end), (b_start, b_end) = [(job["started_at"], job["finished_at"]) for job in finished]
    assert a_start < b_end and b_start < a_end  # they ran at the same time

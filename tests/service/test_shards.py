"""A streamed profile split into block-range shards that run as jobs of their own: in-process
on the embedded default, over RQ workers when scaled out, retried when a worker dies, and
always merged into the profile the model held whole gives."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from rq import Worker
from service_helpers import bearer, job_body, running_app, wait_until_finished
from sqlalchemy import select

from bitalloc.quant.profile import Profile
from bitalloc.quant.shards import plan
from bitalloc.service import jobs, shards
from bitalloc.service.auth import create_token
from bitalloc.service.context import Context
from bitalloc.service.db import transaction
from bitalloc.service.models import JobLogRecord, JobRecord, ProfileRecord, ShardRecord
from bitalloc.service.schemas import JobCreate


def sharded_body(folder: Path, **overrides) -> dict:
    return job_body(**{"model": str(folder), "stream": True, "shards": 2, "calibration": {"seq_len": 32, "samples": 8},
                       **overrides})


def stored_profile(ctx: Context, job_id: str) -> Profile:
    with ctx.sessions() as session:
        job = session.get_one(JobRecord, uuid.UUID(job_id))
        return Profile.load(ctx.storage.path(session.get_one(ProfileRecord, job.profile_id).sha256))


def assert_same_cells(sharded: Profile, whole: Profile) -> None:
    assert [u.name for u in sharded.units] == [u.name for u in whole.units]
    np.testing.assert_allclose(sharded.error, whole.error, rtol=1e-4, atol=1e-12)


def test_the_embedded_worker_runs_the_shards_one_after_another_and_merges_the_whole_profile(
        embedded_settings, model_root):
    settings = embedded_settings.model_copy(update={"model_roots": [model_root]})
    with running_app(settings) as (client, ctx):
        headers = bearer(ctx)
        sharded = client.post("/v1/jobs", json=sharded_body(model_root / "tiny"), headers=headers).json()
        whole = client.post("/v1/jobs", json=job_body(model=str(model_root / "tiny"), calibration={
            "seq_len": 32, "samples": 8}), headers=headers).json()
        done = [wait_until_finished(client, headers, job["id"], timeout=180) for job in (sharded, whole)]
        assert [job["state"] for job in done] == ["succeeded"] * 2, done
        listed = client.get("/v1/jobs", headers=headers).json()
        assert listed["total"] == 2  # the shards are not jobs of the token's list
        view = done[0]["shards"]
        assert [(s["index"], s["blocks"], s["state"], s["attempts"]) for s in view] == [
            (0, [0, 1], "succeeded", 1), (1, [1, 2], "succeeded", 1)]
        assert done[1]["shards"] == []
        assert_same_cells(stored_profile(ctx, sharded["id"]), stored_profile(ctx, whole["id"]))
        assert stored_profile(ctx, sharded["id"]).meta["streamed"] is True


def test_shards_need_a_streamed_model(embedded_settings, model_root):
    settings = embedded_settings.model_copy(update={"model_roots": [model_root]})
    with running_app(settings) as (client, ctx):
        headers = bearer(ctx)
        body = {**sharded_body(model_root / "tiny"), "stream": False}
        job = wait_until_finished(client, headers, client.post("/v1/jobs", json=body, headers=headers).json()["id"])
        assert job["state"] == "failed" and "stream" in job["error"]
        assert client.post("/v1/jobs", json={**body, "shards": 0}, headers=headers).status_code == 422


def test_a_retried_parent_reuses_the_shards_it_measured_and_runs_the_failed_ones_again(embedded_settings):
    """``plan_jobs`` with the same inputs finds the earlier rows; a shard of other inputs cancels them."""
    with running_app(embedded_settings.model_copy(update={"worker_threads": 0})) as (client, ctx):
        with transaction(ctx.sessions) as session:
            token = create_token(session, "t")[0]
            parent, _ = jobs.submit(session, token.id, JobCreate.model_validate(job_body()), ctx.settings)
            first = shards.plan_jobs(session, parent, plan(4, 2), ["a" * 64, "b" * 64])
            first_ids = [r.job_id for r in first]
            session.get_one(JobRecord, first_ids[0]).state = "succeeded"
            session.get_one(JobRecord, first_ids[1]).state = "failed"
        with transaction(ctx.sessions) as session:
            parent = session.get_one(JobRecord, parent.id)
            again = shards.plan_jobs(session, parent, plan(4, 2), ["a" * 64, "b" * 64])
            assert [r.job_id for r in again] == first_ids
            assert [r.job.state for r in again] == ["succeeded", "queued"]
            other = shards.plan_jobs(session, parent, plan(4, 2), ["a" * 64, "c" * 64])
            assert other[0].job_id == first_ids[0] and other[1].job_id != first_ids[1]
        with ctx.sessions() as session:
            assert session.get_one(JobRecord, first_ids[1]).state == "canceled"
            assert [(s.index, s.state) for s in shards.states(session, parent.id)] == [(0, "succeeded"), (1, "queued")]


def worker_env(settings, **more: str) -> dict[str, str]:
    return {**os.environ, "BITALLOC_DATABASE_URL": settings.database_url, "BITALLOC_REDIS_URL": settings.redis_url,
            "BITALLOC_QUEUE_NAME": settings.queue_name, "BITALLOC_DATA_DIR": str(settings.data_dir),
            "BITALLOC_MODEL_ROOTS": f'["{settings.model_roots[0]}"]', "BITALLOC_AUTO_MIGRATE": "0",
            "OMP_NUM_THREADS": "1", **more}


def attempt_pids(ctx: Context, job_id: uuid.UUID) -> list[int]:
    """The process of each attempt at a job, from its log ("attempt i of n on host:pid:thread")."""
    with ctx.sessions() as session:
        lines = session.scalars(select(JobLogRecord.message).where(JobLogRecord.job_id == job_id)
                                .order_by(JobLogRecord.id))
        return [int(m.group(1)) for line in lines if (m := re.match(r"attempt \d+ of \d+ on [^:]+:(\d+):", line))]


@pytest.mark.integration
@pytest.mark.slow
def test_two_rq_workers_share_the_shards_and_a_killed_shard_is_retried(queued_settings, own_pg_url, model_root):
    """Two ``bitalloc worker`` processes: the parent's work horse measures one shard, the other
    worker's the other. That other work horse is killed mid-shard; its lease runs out, the shard
    is retried, and the merged profile still equals the one of the model held whole."""
    settings = queued_settings.model_copy(update={"database_url": own_pg_url, "model_roots": [model_root],
                                                  "lease_seconds": 3.0})
    env = worker_env(settings, BITALLOC_LEASE_SECONDS="3", BITALLOC_HEARTBEAT_SECONDS="0.3",
                     BITALLOC_REAPER_SECONDS="0.5")
    processes = [subprocess.Popen([str(Path(sys.executable).parent / "bitalloc"), "worker"], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(2)]
    try:
        with running_app(settings) as (client, ctx):
            deadline = time.monotonic() + 120
            while len(Worker.all(queue=ctx.queue.rq)) < 2:  # both wait on the queue before the job is sent
                assert time.monotonic() < deadline, "two workers never registered"
                time.sleep(0.1)
            headers = bearer(ctx)
            body = sharded_body(model_root / "tiny", calibration={"seq_len": 64, "samples": 48})
            parent = client.post("/v1/jobs", json=body, headers=headers).json()["id"]
            killed = None
            deadline = time.monotonic() + 180
            while killed is None:
                assert time.monotonic() < deadline, "no shard ever ran outside the parent's work horse"
                with ctx.sessions() as session:
                    assert session.get_one(JobRecord, uuid.UUID(parent)).state in ("queued", "running"), "ran alone"
                    records = session.scalars(select(ShardRecord).where(ShardRecord.parent_id == uuid.UUID(parent)))
                    running = [r.job_id for r in records if r.job.state == "running"]
                home = set(attempt_pids(ctx, uuid.UUID(parent)))
                for job_id in running:
                    elsewhere = [pid for pid in attempt_pids(ctx, job_id) if pid not in home]
                    if elsewhere:
                        os.kill(elsewhere[-1], signal.SIGKILL)
                        killed = job_id
                time.sleep(0.05)
            job = wait_until_finished(client, headers, parent, timeout=240)
            assert job["state"] == "succeeded", job
            assert [s["state"] for s in job["shards"]] == ["succeeded"] * 2
            with ctx.sessions() as session:
                retried = session.get_one(JobRecord, killed)
                log = list(session.scalars(select(JobLogRecord.message).where(JobLogRecord.job_id == killed)))
            assert retried.attempts == 2 and any(m.startswith("worker lost") for m in log), log
            whole = client.post("/v1/jobs", json={**body, "stream": False, "shards": 1}, headers=headers).json()
            assert wait_until_finished(client, headers, whole["id"], timeout=240)["state"] == "succeeded"
            assert_same_cells(stored_profile(ctx, parent), stored_profile(ctx, whole["id"]))
    finally:
        for process in processes:
            process.kill()
            process.wait()

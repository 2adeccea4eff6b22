"""End to end through HTTP: submit, a worker runs the job, the front is stored, and the
downloaded configuration is what ``search`` computes directly on the job's profile."""

from __future__ import annotations

import hashlib
import os
import time
import uuid

import numpy as np
import pytest
from rq import SimpleWorker
from service_helpers import bearer, job_body, metric, running_app, wait_until_finished
from sqlalchemy import select

from bitalloc.pipeline.problem import problem_of
from bitalloc.quant.profile import Profile
from bitalloc.search import Budgets, front, solve
from bitalloc.service import models, worker


def stored_profile(client, headers, job_id: str, tmp_path) -> Profile:
    """The job's profile, downloaded as its artifact (checked against its sha256)."""
    artifacts = client.get(f"/v1/jobs/{job_id}/artifacts", headers=headers).json()
    (artifact,) = [a for a in artifacts if a["kind"] == "profile"]
    response = client.get(f"/v1/artifacts/{artifact['id']}", headers=headers)
    assert response.status_code == 200 and hashlib.sha256(response.content).hexdigest() == artifact["sha256"]
    path = tmp_path / f"{job_id}.npz"
    path.write_bytes(response.content)
    return Profile.load(path)


def check_succeeded_job(client, headers, job: dict, tmp_path) -> dict:
    """Front, points, allocation and config of a succeeded job agree with ``search`` on its profile."""
    assert job["state"] == "succeeded", job
    assert job["progress"]["percent"] == 100 and job["attempts"] == 1 and job["error"] is None
    job_id = job["id"]
    profile = stored_profile(client, headers, job_id, tmp_path)
    problem = problem_of(profile)

    stored = client.get(f"/v1/jobs/{job_id}/front", headers=headers).json()
    points = stored["points"]
    assert len(points) >= 2 and {"id", "avg_bits", "bytes", "error", "latency", "measured_kl"} <= set(points[0])
    swept = {(a.bytes, a.error) for a in front(problem, ("error", "bytes"), job["spec"]["points"], solver="dp")}
    extra = [p for p in points if (p["bytes"], p["error"]) not in swept]
    assert swept <= {(p["bytes"], p["error"]) for p in points} and all(p["chosen"] for p in extra) and len(extra) <= 1
    assert [p["bytes"] for p in points] == sorted(p["bytes"] for p in points)
    assert all(a["error"] > b["error"] for a, b in zip(points, points[1:]))  # non-dominated: smaller costs error

    budgets = Budgets(max_avg_bits=job["spec"]["budgets"]["avg_bits"])
    direct = solve(problem, budgets, solver="dp")
    chosen = client.get(f"/v1/jobs/{job_id}/allocation", headers=headers).json()
    assert chosen["id"] == stored["chosen_point_id"] and chosen["formats"] == direct.formats

    response = client.get(f"/v1/jobs/{job_id}/points/{chosen['id']}/config?format=json", headers=headers)
    assert response.status_code == 200 and "attachment" in response.headers["Content-Disposition"]
    assert hashlib.sha256(response.content).hexdigest() == response.headers["X-Content-SHA256"]
    config = response.json()
    assert config["formats"] == direct.formats and config["model"] == job["spec"]["model"]
    assert config["totals"]["bytes"] == direct.bytes and config["totals"]["avg_bits"] == pytest.approx(direct.avg_bits)
    assert config["totals"]["avg_bits"] <= 5.0 and config["profile"]["sha256"] == stored["profile"]["sha256"]

    smallest = client.get(f"/v1/jobs/{job_id}/points/{points[0]['id']}", headers=headers).json()
    assert sum(problem.numel) * smallest["avg_bits"] / 8 == pytest.approx(smallest["bytes"])
    assert set(smallest["formats"]) == set(profile.unit_names)

    evaluation = job["result"]["evaluation"]
    assert evaluation["kl"] > 0 and evaluation["tokens"] == 2 * 31
    phases = [line["message"] for line in client.get(f"/v1/jobs/{job_id}/log", headers=headers).json()]
    assert phases[0] == "queued" and "output_mse: started" in phases and "evaluate: started" in phases
    assert "computed on cpu in float32" in phases  # where the job computed, apart from the latency hardware
    assert phases[-1].startswith("succeeded")
    return config


def check_isolated(client, owner, other, job_id: str) -> None:
    """Another token gets 404 for the job, its front, points, config and artifacts."""
    point_id = client.get(f"/v1/jobs/{job_id}/front", headers=owner).json()["points"][0]["id"]
    artifact_id = client.get(f"/v1/jobs/{job_id}/artifacts", headers=owner).json()[0]["id"]
    for path in [f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/front", f"/v1/jobs/{job_id}/allocation",
                 f"/v1/jobs/{job_id}/points/{point_id}", f"/v1/jobs/{job_id}/points/{point_id}/config?format=json",
                 f"/v1/jobs/{job_id}/artifacts", f"/v1/artifacts/{artifact_id}"]:
        assert client.get(path, headers=other).status_code == 404, path
    assert client.delete(f"/v1/jobs/{job_id}", headers=other).status_code == 404
    assert client.get(f"/v1/jobs/{job_id}", headers=owner).status_code == 200


@pytest.mark.slow
def test_embedded_default_end_to_end(embedded_settings, tmp_path, zoo):
    """SQLite + the in-process worker: a job succeeds; unknown models and infeasible budgets fail with
    their reason; a running job is canceled."""
    with running_app(embedded_settings) as (client, ctx):
        owner, other = bearer(ctx, "owner"), bearer(ctx, "other")
        job_id = client.post("/v1/jobs", json=job_body(), headers=owner).json()["id"]
        check_succeeded_job(client, owner, wait_until_finished(client, owner, job_id), tmp_path)
        check_isolated(client, owner, other, job_id)

        unknown = client.post("/v1/jobs", json=job_body(model="factory:no-such-model"), headers=owner).json()["id"]
        infeasible = client.post("/v1/jobs", json=job_body(budgets={"avg_bits": 1.0}), headers=owner).json()["id"]
        unknown, infeasible = (wait_until_finished(client, owner, j) for j in (unknown, infeasible))
        assert unknown["state"] == "failed" and "unknown factory 'no-such-model'" in unknown["error"]
        assert infeasible["state"] == "failed" and "max_avg_bits=1 is infeasible" in infeasible["error"]
        assert "smallest achievable average is 2.5" in infeasible["error"]

        running = client.post("/v1/jobs", json=job_body(calibration={"seq_len": 32, "samples": 4, "seed": 1}),
                              headers=owner).json()["id"]
        while client.get(f"/v1/jobs/{running}", headers=owner).json()["state"] == "queued":
            time.sleep(0.02)
        assert client.post(f"/v1/jobs/{running}/cancel", headers=owner).status_code == 202
        canceled = wait_until_finished(client, owner, running)
        assert canceled["state"] == "canceled" and canceled["progress"]["percent"] < 100
        assert client.get(f"/v1/jobs/{running}/front", headers=owner).status_code == 409

        assert metric(client, "bitalloc_jobs", state="succeeded") == 1
        assert metric(client, "bitalloc_jobs", state="failed") == 2
        assert metric(client, "bitalloc_jobs", state="canceled") == 1
        assert metric(client, "bitalloc_job_duration_seconds_count", state="succeeded") == 1
        assert metric(client, "bitalloc_queue_depth") == 0

        artifacts = client.get(f"/v1/jobs/{job_id}/artifacts", headers=owner).json()
        assert client.delete(f"/v1/jobs/{job_id}", headers=owner).status_code == 204
        for path in [f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/front", *(f"/v1/artifacts/{a['id']}" for a in artifacts)]:
            assert client.get(path, headers=owner).status_code == 404, path
        with ctx.sessions() as session:
            for table in (models.JobLogRecord, models.FrontRecord, models.AllocationRecord, models.ArtifactRecord):
                assert not session.scalars(select(table).where(table.job_id == uuid.UUID(job_id))).all(), table


@pytest.mark.slow
def test_a_surrogate_job_stores_what_it_measured_and_its_fit(embedded_settings, tmp_path, zoo):
    """The surrogate's measured allocations are the job's artifact (a row and a blob, only the
    owner's), and its rounds and held-out fit are the chosen point's info."""
    with running_app(embedded_settings) as (client, ctx):
        owner, other = bearer(ctx, "owner"), bearer(ctx, "other")
        job_id = client.post("/v1/jobs", json=job_body(surrogate=2), headers=owner).json()["id"]
        job = wait_until_finished(client, owner, job_id, timeout=300)
        assert job["state"] == "succeeded", job
        chosen = client.get(f"/v1/jobs/{job_id}/allocation", headers=owner).json()
        info = chosen["info"]
        assert chosen["solver"] == "surrogate" and info["rounds"] and info["held_out"]["configurations"] >= 4
        assert {"predicted", "measured", "p_value"} <= set(info["rounds"][0])
        (artifact,) = [a for a in client.get(f"/v1/jobs/{job_id}/artifacts", headers=owner).json()
                       if a["kind"] == "surrogate"]
        response = client.get(f"/v1/artifacts/{artifact['id']}", headers=owner)
        assert response.status_code == 200 and hashlib.sha256(response.content).hexdigest() == artifact["sha256"]
        assert client.get(f"/v1/artifacts/{artifact['id']}", headers=other).status_code == 404
        path = tmp_path / "measured.npz"
        path.write_bytes(response.content)
        with np.load(path) as data:
            assert len(data["choices"]) == info["evaluations"] and data["values"].shape[1] >= 2
            assert list(data["units"]) == list(chosen["formats"])


@pytest.mark.integration
@pytest.mark.slow
def test_queue_end_to_end_on_postgres_and_redis(queued_settings, tmp_path, monkeypatch, zoo):
    """PostgreSQL + RQ: the API enqueues, a real RQ worker runs the job, the front is stored."""
    with running_app(queued_settings) as (client, ctx):
        owner = bearer(ctx, "owner")
        succeeded = metric(client, "bitalloc_jobs", state="succeeded")
        response = client.post("/v1/jobs", json=job_body(), headers=owner)
        assert response.status_code == 201 and response.json()["state"] == "queued"
        assert ctx.queue.rq.count == 1
        error_budget = client.post("/v1/jobs", json=job_body(budgets={"error": 1.0}), headers=owner).json()["id"]

        monkeypatch.setitem(worker._contexts, os.getpid(), ctx)
        SimpleWorker([ctx.queue.rq], connection=ctx.queue.redis).work(burst=True)

        job = client.get(f"/v1/jobs/{response.json()['id']}", headers=owner).json()
        check_succeeded_job(client, owner, job, tmp_path)
        check_isolated(client, owner, bearer(ctx, "other"), job["id"])

        # An error budget alone asks for the smallest allocation within it.
        job = client.get(f"/v1/jobs/{error_budget}", headers=owner).json()
        assert job["state"] == "succeeded" and job["result"]["profile_cached"] is True
        problem = problem_of(stored_profile(client, owner, error_budget, tmp_path))
        direct = solve(problem, Budgets(max_error=1.0), solver="dp", objective="bytes")
        config = client.get(f"/v1/jobs/{error_budget}/points/{job['result']['chosen_point_id']}/config",
                            headers=owner).json()
        assert config["formats"] == direct.formats and config["totals"]["error"] <= 1.0
        assert metric(client, "bitalloc_jobs", state="succeeded") == succeeded + 2


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.reference
def test_reference_lm_job_on_postgres_and_redis(queued_settings, tmp_path, monkeypatch, zoo):
    """The real SmolLM2 through HTTP, RQ and PostgreSQL, at a tiny calibration size."""
    body = job_body(model="zoo:llm", formats=["int4_g128", "int8_g128"], budgets={"avg_bits": 6.0}, points=4,
                    calibration={"seq_len": 64, "samples": 2}, evaluation={"windows": 1})
    with running_app(queued_settings) as (client, ctx):
        owner = bearer(ctx, "owner")
        job_id = client.post("/v1/jobs", json=body, headers=owner).json()["id"]
        monkeypatch.setitem(worker._contexts, os.getpid(), ctx)
        SimpleWorker([ctx.queue.rq], connection=ctx.queue.redis).work(burst=True)
        job = client.get(f"/v1/jobs/{job_id}", headers=owner).json()
        assert job["state"] == "succeeded", job
        problem = problem_of(stored_profile(client, owner, job_id, tmp_path))
        assert len(problem.unit_names) == 210
        direct = solve(problem, Budgets(max_avg_bits=6.0), solver="dp")
        config = client.get(f"/v1/jobs/{job_id}/points/{job['result']['chosen_point_id']}/config?format=json",
                            headers=owner).json()
        assert config["formats"] == direct.formats and config["totals"]["avg_bits"] <= 6.0
        assert set(config["formats"].values()) == {"int4_g128", "int8_g128"}
        evaluation = job["result"]["evaluation"]
        assert evaluation["tokens"] == 63 and 0 < evaluation["kl"] < 1

"""The HTTP contract without running jobs: validation, tokens, idempotency, cancel, delete, list."""

from __future__ import annotations

import uuid

import pytest
from service_helpers import bearer, job_body, running_app
from sqlalchemy import func, select, update

from bitalloc.service.models import JobRecord
from bitalloc.service.settings import Settings


@pytest.fixture
def api(tmp_path):
    """The embedded default with no worker threads: submitted jobs stay queued."""
    with running_app(Settings(data_dir=tmp_path / "data", worker_threads=0, reaper_seconds=3600)) as (client, ctx):
        yield client, ctx, bearer(ctx, "a")


def job_count(ctx) -> int:
    with ctx.sessions() as session:
        return session.scalar(select(func.count()).select_from(JobRecord))


BAD_FIELDS = [
    ({"model": None}, ("body", "model")),
    ({"model": ""}, ("body", "model")),
    ({"model": "zoo:llm\n"}, ("body", "model")),
    ({"formats": []}, ("body", "formats")),
    ({"formats": "int4_g32"}, ("body", "formats")),
    ({"formats": ["int4_g32", "int7_g32"]}, ("body", "formats", 1)),
    ({"formats": ["int4_g32", "int4_g32"]}, ("body", "formats")),
    ({"metric": "accuracy"}, ("body", "metric")),
    ({"solver": "refine"}, ("body", "solver")),
    ({"method": "awq"}, ("body", "method")),
    ({"budgets": {"avg_bits": -1}}, ("body", "budgets", "avg_bits")),
    ({"budgets": {"avg_bits": "four"}}, ("body", "budgets", "avg_bits")),
    ({"budgets": {"bytes": 1.5}}, ("body", "budgets", "bytes")),
    ({"budgets": {"latency": 0}}, ("body", "budgets", "latency")),
    ({"budgets": {"error": -0.1}}, ("body", "budgets", "error")),
    ({"budgets": {"kl": 0.1}}, ("body", "budgets")),
    ({"budgets": {"bits": 4}}, ("body", "budgets", "bits")),
    ({"points": 1}, ("body", "points")),
    ({"kv_cache": {"context": 0}}, ("body", "kv_cache", "context")),
    ({"kv_cache": {"batch": -1}}, ("body", "kv_cache", "batch")),
    ({"calibration": {"samples": 0}}, ("body", "calibration", "samples")),
    ({"calibration": {"seq_len": 4}}, ("body", "calibration", "seq_len")),
    ({"calibration": {"seed": -1}}, ("body", "calibration", "seed")),
    ({"calibration": {"source": ""}}, ("body", "calibration", "source")),
    ({"evaluation": {"windows": 0}}, ("body", "evaluation", "windows")),
    ({"hardware": "tpu"}, ("body", "hardware")),
    ({"dtype": "int8"}, ("body", "dtype")),
    ({"device": "h100"}, ("body", "device")),
    ({"colour": "blue"}, ("body", "colour")),
]


@pytest.mark.parametrize("change, loc", BAD_FIELDS, ids=[".".join(map(str, loc[1:])) + f"={c}" for c, loc in BAD_FIELDS])
def test_invalid_fields_are_422s_naming_the_field_and_reason(api, change, loc):
    client, ctx, headers = api
    body = {k: v for k, v in job_body(**change).items() if v is not None}
    response = client.post("/v1/jobs", json=body, headers=headers)
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(tuple(e["loc"]) == loc and e["msg"] for e in errors), errors
    assert job_count(ctx) == 0


def test_the_old_latency_target_field_names_its_new_name(api):
    client, ctx, headers = api
    response = client.post("/v1/jobs", json=job_body(device="a100"), headers=headers)
    assert response.status_code == 422
    (error,) = [e for e in response.json()["detail"] if e["loc"][-1] == "device"]
    assert '"hardware": "a100"' in error["msg"]
    assert job_count(ctx) == 0


def test_the_reason_is_in_words(api):
    client, _, headers = api
    detail = client.post("/v1/jobs", json=job_body(formats=["int7_g32"]), headers=headers).json()["detail"]
    assert "integer widths are" in detail[0]["msg"]
    detail = client.post("/v1/jobs", json=job_body(budgets={"kl": 0.1}), headers=headers).json()["detail"]
    assert "a metric in KL units" in detail[0]["msg"]


def test_bad_query_path_header_and_json_are_422s(api):
    client, _, headers = api
    job = uuid.uuid4()
    cases = [
        (client.get(f"/v1/jobs/{job}/points/1/config?format=xml", headers=headers), ("query", "format")),
        (client.get("/v1/jobs/not-a-uuid", headers=headers), ("path", "job_id")),
        (client.get("/v1/jobs?limit=0", headers=headers), ("query", "limit")),
        (client.get("/v1/jobs?state=done", headers=headers), ("query", "state")),
        (client.post("/v1/jobs", json=job_body(), headers={**headers, "Idempotency-Key": "k" * 256}),
         ("header", "idempotency-key")),
    ]
    for response, loc in cases:
        assert response.status_code == 422
        assert tuple(response.json()["detail"][0]["loc"]) == loc
    response = client.post("/v1/jobs", content=b"{not json", headers={**headers, "Content-Type": "application/json"})
    assert response.status_code == 422 and response.json()["detail"][0]["type"] == "json_invalid"


@pytest.mark.parametrize("change, loc", [
    ({"calibration": {"source": "/etc/passwd"}}, ["body", "calibration", "source"]),
    ({"evaluation": {"source": "/etc/hostname"}}, ["body", "evaluation", "source"]),
    ({"calibration": {"source": "datasets:/some/dir/outside:train"}}, ["body", "calibration", "source"]),
    ({"calibration": {"source": "datasets:csv:train"}}, ["body", "calibration", "source"]),
    ({"evaluation": {"source": "datasets:json:data/*.json:train"}}, ["body", "evaluation", "source"]),
    ({"model": "/etc"}, ["body", "model"]),
    ({"model": "../../outside/model.gguf"}, ["body", "model"]),
], ids=["calibration-file", "evaluation-file", "datasets-path", "datasets-csv-builder", "datasets-glob",
        "model-path", "model-relative"])
def test_every_path_a_job_reads_must_lie_inside_the_model_roots(tmp_path, change, loc):
    inside = tmp_path / "models" / "calib.txt"
    settings = Settings(data_dir=tmp_path / "data", worker_threads=0, model_roots=[tmp_path / "models"])
    with running_app(settings) as (client, ctx):
        headers = bearer(ctx)
        outside = client.post("/v1/jobs", json=job_body(**change), headers=headers)
        assert outside.status_code == 422, outside.text
        assert outside.json()["detail"][0]["loc"] == loc
        assert job_count(ctx) == 0
        ok = client.post("/v1/jobs", json=job_body(calibration={"source": str(inside)}), headers=headers)
        assert ok.status_code == 201


def test_the_worker_holds_a_stored_job_to_the_policy_it_runs_under(tmp_path):
    """A job stored before the roots were set (or written to the database directly) still fails
    in the worker, naming the refusal and nothing of the file."""
    from bitalloc.pipeline import JobSpec, run_job
    from bitalloc.pipeline.inputs import InputError
    from bitalloc.quant.loading import LoadPolicy

    secret = tmp_path / "secret.txt"
    secret.write_text("the first line of a private file\n" * 100)
    spec = JobSpec(model="factory:tiny-llama", formats=["int4_g32"], calibration=str(secret))
    with pytest.raises(InputError, match="outside the configured model roots") as refused:
        run_job(spec, profile_dir=tmp_path / "profiles", policy=LoadPolicy(model_roots=(tmp_path / "models",)))
    assert refused.value.field == "calibration.source" and "private" not in str(refused.value)


def test_requests_need_a_live_token(api):
    client, ctx, headers = api
    assert client.get("/v1/jobs").status_code == 401
    assert client.get("/v1/jobs").headers["WWW-Authenticate"] == "Bearer"
    assert client.get("/v1/jobs", headers={"Authorization": "Bearer bat_nope"}).status_code == 401
    assert client.get("/v1/jobs", headers=headers).status_code == 200
    from bitalloc.service.auth import revoke_tokens
    from bitalloc.service.db import transaction

    with transaction(ctx.sessions) as session:
        revoke_tokens(session, "a")
    assert client.get("/v1/jobs", headers=headers).status_code == 401


def test_submit_returns_201_with_a_queued_job_and_its_location(api):
    client, _, headers = api
    response = client.post("/v1/jobs", json=job_body(), headers=headers)
    assert response.status_code == 201
    job = response.json()
    assert job["state"] == "queued" and job["progress"]["percent"] == 0 and job["attempts"] == 0
    assert response.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert job["spec"]["budgets"]["avg_bits"] == 5.0 and job["spec"]["formats"] == job_body()["formats"]


def test_a_retried_submission_with_the_same_key_returns_the_same_job(api):
    client, ctx, headers = api
    key = {"Idempotency-Key": "retry-1"}
    first = client.post("/v1/jobs", json=job_body(), headers={**headers, **key})
    again = client.post("/v1/jobs", json=job_body(), headers={**headers, **key})
    assert first.status_code == 201 and again.status_code == 201
    assert again.json()["id"] == first.json()["id"] and again.headers["Idempotent-Replayed"] == "true"
    assert job_count(ctx) == 1
    changed = client.post("/v1/jobs", json=job_body(points=7), headers={**headers, **key})
    assert changed.status_code == 422 and changed.json()["detail"][0]["loc"] == ["header", "Idempotency-Key"]
    other_token = client.post("/v1/jobs", json=job_body(), headers={**bearer(ctx, "b"), **key})
    assert other_token.json()["id"] != first.json()["id"] and job_count(ctx) == 2


def test_a_queue_that_refuses_the_job_is_a_503_and_the_job_stays_queued_for_a_retry(api, monkeypatch):
    client, ctx, headers = api
    sent = []

    def refuse(job_id, attempt):
        raise ConnectionError("redis is down")

    monkeypatch.setattr(ctx.queue, "enqueue", refuse)
    key = {"Idempotency-Key": "once"}
    response = client.post("/v1/jobs", json=job_body(), headers={**headers, **key})
    assert response.status_code == 503 and "redis is down" in response.json()["detail"]
    (job,) = client.get("/v1/jobs", headers=headers).json()["items"]
    assert job["state"] == "queued" and job["id"] in response.json()["detail"]
    log = [line["message"] for line in client.get(f"/v1/jobs/{job['id']}/log", headers=headers).json()]
    assert any(m.startswith("could not enqueue: redis is down") for m in log)
    monkeypatch.setattr(ctx.queue, "enqueue", lambda job_id, attempt: sent.append((str(job_id), attempt)))
    monkeypatch.setattr(ctx.queue, "pending", lambda job_id, attempt: bool(sent))  # a queue of messages, like RQ
    retry = client.post("/v1/jobs", json=job_body(), headers={**headers, **key})  # the queue is back
    assert retry.status_code == 201 and retry.json()["id"] == job["id"] and retry.headers["Idempotent-Replayed"]
    assert sent == [(job["id"], 1)] and job_count(ctx) == 1


def test_cancel_a_queued_job_then_delete_it(api):
    client, _, headers = api
    job_id = client.post("/v1/jobs", json=job_body(), headers=headers).json()["id"]
    canceled = client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    assert canceled.status_code == 202 and canceled.json()["state"] == "canceled"
    assert client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).status_code == 409
    assert [line["message"] for line in client.get(f"/v1/jobs/{job_id}/log", headers=headers).json()] == [
        "queued", "canceled while queued"]
    assert client.get(f"/v1/jobs/{job_id}/front", headers=headers).status_code == 409
    assert client.delete(f"/v1/jobs/{job_id}", headers=headers).status_code == 204
    assert client.get(f"/v1/jobs/{job_id}", headers=headers).status_code == 404


def test_a_running_job_is_asked_to_stop_and_cannot_be_deleted(api):
    client, ctx, headers = api
    job_id = client.post("/v1/jobs", json=job_body(), headers=headers).json()["id"]
    with ctx.sessions.begin() as session:
        session.execute(update(JobRecord).where(JobRecord.id == uuid.UUID(job_id)).values(state="running"))
    assert client.delete(f"/v1/jobs/{job_id}", headers=headers).status_code == 409
    response = client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    assert response.json()["state"] == "running" and response.json()["cancel_requested"] is True


def test_list_filters_by_state_and_pages(api):
    client, _, headers = api
    ids = [client.post("/v1/jobs", json=job_body(points=p), headers=headers).json()["id"] for p in (2, 3, 4)]
    client.post(f"/v1/jobs/{ids[0]}/cancel", headers=headers)
    listed = client.get("/v1/jobs?limit=2", headers=headers).json()
    assert listed["total"] == 3 and [j["id"] for j in listed["items"]] == ids[::-1][:2]
    assert [j["id"] for j in client.get("/v1/jobs?state=canceled", headers=headers).json()["items"]] == [ids[0]]
    assert client.get("/v1/jobs?offset=2", headers=headers).json()["items"][0]["id"] == ids[0]


def test_another_token_cannot_see_or_touch_a_job(api):
    client, ctx, headers = api
    job_id = client.post("/v1/jobs", json=job_body(), headers=headers).json()["id"]
    other = bearer(ctx, "b")
    for method, path in [("get", ""), ("get", "/progress"), ("get", "/log"), ("get", "/front"), ("get", "/artifacts"),
                         ("post", "/cancel"), ("delete", "")]:
        assert getattr(client, method)(f"/v1/jobs/{job_id}{path}", headers=other).status_code == 404, path
    assert client.get("/v1/jobs", headers=other).json()["total"] == 0
    assert client.get(f"/v1/jobs/{job_id}", headers=headers).json()["state"] == "queued"


def test_health_readiness_metrics_and_docs(api):
    client, _, headers = api
    client.post("/v1/jobs", json=job_body(), headers=headers)
    assert client.get("/v1/health").json() == {"status": "ok"}
    ready = client.get("/v1/ready")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "queue": "ok"}
    metrics = client.get("/metrics").text
    assert 'bitalloc_jobs{state="queued"} 1.0' in metrics and "bitalloc_queue_depth 1.0" in metrics
    assert "bitalloc_job_duration_seconds" in metrics
    paths = client.get("/v1/openapi.json").json()["paths"]
    assert "/v1/jobs/{job_id}/points/{point_id}/config" in paths
    assert client.get("/v1/docs").status_code == 200


RAW_BODIES = [
    ('"budgets": {"avg_bits": NaN}', ["body", "budgets", "avg_bits"]),
    ('"budgets": {"latency": Infinity}', ["body", "budgets", "latency"]),
    ('"budgets": {"measured_kl": -Infinity}', ["body", "budgets", "measured_kl"]),
    ('"model": "zoo:\\ud800"', ["body", "model"]),
    ('"formats": ["int4_g32", "\\ud800"]', ["body", "formats"]),
    ('"hardware": "\\udfff"', ["body", "hardware"]),
    ('"baseline": "uniform:\\ud800"', ["body", "baseline"]),
    ('"budgets": {"bytes": 9223372036854775808}', ["body", "budgets", "bytes"]),
]


@pytest.mark.parametrize("field, loc", RAW_BODIES, ids=[loc[-1] + str(i) for i, (_, loc) in enumerate(RAW_BODIES)])
def test_non_finite_numbers_broken_unicode_and_huge_integers_are_422s(api, field, loc):
    client, ctx, headers = api
    body = '{"model": "factory:tiny-llama", "formats": ["int4_g32"], ' + field + "}"
    body = body.replace('"model": "factory:tiny-llama", ', "") if field.startswith('"model"') else body
    body = body.replace('"formats": ["int4_g32"], ', "") if field.startswith('"formats"') else body
    response = client.post("/v1/jobs", content=body.encode(), headers={**headers, "Content-Type": "application/json"})
    assert response.status_code == 422, response.text
    assert any(e["loc"] == loc for e in response.json()["detail"]), response.json()
    assert job_count(ctx) == 0


@pytest.mark.parametrize("path", ["/v1/jobs?offset=9223372036854775808", "/v1/jobs?offset=2147483648",
                                  "/v1/jobs/{job}/log?after=1e20", "/v1/jobs/{job}/points/2147483648",
                                  "/v1/jobs/{job}/points/0/config", "/v1/builds/{job}/log?after=99999999999"])
def test_integers_beyond_what_the_database_holds_are_422s(api, path):
    client, _, headers = api
    job = client.post("/v1/jobs", json=job_body(), headers=headers).json()["id"]
    response = client.get(path.format(job=job), headers=headers)
    assert response.status_code == 422, response.text


def test_a_422_echoes_only_an_excerpt_and_a_large_body_is_a_413(tmp_path):
    settings = Settings(data_dir=tmp_path / "data", worker_threads=0, max_request_bytes=64 * 1024)
    with running_app(settings) as (client, ctx):
        headers = bearer(ctx)
        long_model = "x" * 50_000
        response = client.post("/v1/jobs", json=job_body(model=long_model), headers=headers)
        assert response.status_code == 422 and len(response.content) < 2_000
        (error,) = [e for e in response.json()["detail"] if e["loc"] == ["body", "model"]]
        assert error["input"] == "x" * 80 + "..."
        huge = client.post("/v1/jobs", json=job_body(model="y" * 100_000), headers=headers)
        assert huge.status_code == 413 and len(huge.content) < 200
        chunks = (b'{"model": "' + b"z" * 10_000 for _ in range(10))  # no Content-Length: counted as it streams
        streamed = client.post("/v1/jobs", content=chunks, headers={**headers, "Content-Type": "application/json"})
        assert streamed.status_code == 413
        assert job_count(ctx) == 0
        assert client.post("/v1/jobs", json=job_body(), headers=headers).status_code == 201

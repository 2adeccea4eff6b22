"""A point's build, as a background job: bitalloc's packed artifact end to end on the embedded default
and on PostgreSQL + RQ, and what must hold around it (ownership, conflicts, idempotency, failure); a
GGUF and a compressed-tensors checkpoint of a point, downloaded and read back by their own libraries."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import uuid

import pytest
import torch
from rq import SimpleWorker
from service_helpers import bearer, job_body, running_app, wait_until_finished
from sqlalchemy import null, select, update

from bitalloc.quant.artifact import ArtifactError, load_artifact
from bitalloc.quant.llamacpp import tools as llamacpp_tools
from bitalloc.service import builds, models, worker
from bitalloc.service.settings import Settings


def wait_for_build(client, headers: dict, build_id: str, timeout: float = 180.0) -> dict:
    return wait_until_finished(client, headers, build_id, timeout, path="builds")


def chosen_point(client, headers: dict, job_id: str) -> dict:
    job = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
    assert job["state"] == "succeeded", job
    return client.get(f"/v1/jobs/{job_id}/points/{job['result']['chosen_point_id']}", headers=headers).json()


def check_built(client, ctx, headers: dict, build: dict, point: dict, tmp_path) -> dict:
    """The download is the stored tar (its sha256 in the header and the Artifact row), and the
    tar holds an artifact that loads, verified, with the point's allocation. Returns its manifest."""
    assert build["state"] == "succeeded" and build["error"] is None and build["progress"]["percent"] == 100, build
    artifact = build["artifact"]
    response = client.get(f"/v1/artifacts/{artifact['id']}", headers=headers)
    assert response.status_code == 200 and response.headers["content-type"] == "application/x-tar"
    sha256 = hashlib.sha256(response.content).hexdigest()
    assert sha256 == response.headers["X-Content-SHA256"] == artifact["sha256"]
    assert len(response.content) == artifact["size"] and artifact["name"] in response.headers["content-disposition"]
    with ctx.sessions() as session:
        row = session.get(models.ArtifactRecord, uuid.UUID(artifact["id"]))
        token_id = session.get(models.JobRecord, uuid.UUID(build["job_id"])).token_id
    assert (row.kind, row.sha256, row.size, row.job_id, row.token_id) == (
        "model", sha256, len(response.content), uuid.UUID(build["job_id"]), token_id)
    assert row.meta["build_id"] == build["id"] and row.meta["point_id"] == point["id"]

    out = tmp_path / build["id"]
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        tar.extractall(out, filter="data")
    (folder,) = out.iterdir()
    loaded = load_artifact(folder)
    assert loaded.info["source"] == "factory:tiny-llama"
    manifest = json.loads((folder / "bitalloc_artifact.json").read_text())
    assert manifest["allocation"] == point["formats"] and manifest["method"] == build["method"]
    return manifest


@pytest.mark.slow
def test_embedded_build_end_to_end(embedded_settings, tmp_path, monkeypatch, zoo):
    """SQLite + the in-process worker: build a point as RTN, download and load it; asking again returns
    that build; another token sees nothing; a failing build fails with its reason and a new request
    builds afresh (GPTQ); builds run the job's stored spec, not its request (which today's schema may
    refuse), and fail asking for the job again where it has none; the jobs list shows compression jobs
    only; deleting the job takes its builds and their stored tars."""
    with running_app(embedded_settings) as (client, ctx):
        owner, other = bearer(ctx, "owner"), bearer(ctx, "other")
        job_id = client.post("/v1/jobs", json=job_body(), headers=owner).json()["id"]
        wait_until_finished(client, owner, job_id)
        point = chosen_point(client, owner, job_id)
        url = f"/v1/jobs/{job_id}/points/{point['id']}/artifact"
        with ctx.sessions.begin() as session:  # a request today's schema refuses: builds read the job's run_spec
            session.execute(update(models.JobRecord).where(models.JobRecord.id == uuid.UUID(job_id))
                            .values(spec={**job_body(), "colour": "blue"}))

        response = client.post(url, json={"method": "rtn"}, headers=owner)
        assert response.status_code == 202, response.text
        build = response.json()
        assert build["state"] in ("queued", "running") and build["artifact"] is None
        assert (build["method"], build["target"]) == ("rtn", "bitalloc")
        assert (build["job_id"], build["point_id"]) == (job_id, point["id"])
        assert response.headers["Location"] == f"/v1/builds/{build['id']}"
        again = client.post(url, headers=owner)  # no body: rtn
        assert again.status_code == 200 and again.json()["id"] == build["id"]
        for response in (client.post(url, json={"method": "rtn"}, headers=other),
                         client.get(f"/v1/builds/{build['id']}", headers=other),
                         client.get(f"/v1/builds/{build['id']}/log", headers=other),
                         client.post(f"/v1/builds/{build['id']}/cancel", headers=other)):
            assert response.status_code == 404, response.text

        built = wait_for_build(client, owner, build["id"])
        check_built(client, ctx, owner, built, point, tmp_path)
        assert client.get(f"/v1/artifacts/{built['artifact']['id']}", headers=other).status_code == 404
        listed = client.get(f"/v1/jobs/{job_id}/artifacts", headers=owner).json()
        assert built["artifact"]["id"] in [a["id"] for a in listed if a["kind"] == "model"]
        repeated = client.post(url, json={"method": "rtn"}, headers=owner)
        assert repeated.status_code == 200 and repeated.json() == built
        log = [line["message"] for line in client.get(f"/v1/builds/{build['id']}/log", headers=owner).json()]
        assert log[0].startswith("queued") and "quantize: started" in log and log[-1].startswith("succeeded: artifact")

        def broken(*args, **kwargs):
            raise ArtifactError("allocation: this build was made to fail")

        monkeypatch.setattr(builds, "build_target", broken)
        failing = client.post(url, json={"method": "gptq"}, headers=owner).json()
        failed = wait_for_build(client, owner, failing["id"])
        assert failed["state"] == "failed" and failed["error"] == "allocation: this build was made to fail"
        assert failed["artifact"] is None and failed["attempts"] == 1
        log = client.get(f"/v1/builds/{failing['id']}/log", headers=owner).json()
        assert log[-1] == {**log[-1], "level": "error", "message": "failed: allocation: this build was made to fail"}
        monkeypatch.undo()

        retried = client.post(url, json={"method": "gptq"}, headers=owner)
        assert retried.status_code == 202 and retried.json()["id"] != failing["id"]
        gptq = wait_for_build(client, owner, retried.json()["id"])
        manifest = check_built(client, ctx, owner, gptq, point, tmp_path)
        assert manifest["calibration"] is not None and gptq["artifact"]["sha256"] != built["artifact"]["sha256"]

        with ctx.sessions.begin() as session:  # as migration 0005 leaves a job whose request it cannot read
            session.execute(update(models.JobRecord).where(models.JobRecord.id == uuid.UUID(job_id))
                            .values(run_spec=null()))
        unrunnable = client.post(url, json={"target": "compressed-tensors"}, headers=owner).json()
        failed = wait_for_build(client, owner, unrunnable["id"])
        assert failed["state"] == "failed" and failed["error"].endswith("could not be converted: submit it again")
        assert f"job {job_id} was submitted before" in failed["error"]

        listed = client.get("/v1/jobs", headers=owner).json()
        assert listed["total"] == 1 and [j["id"] for j in listed["items"]] == [job_id]
        assert client.get(f"/v1/jobs/{build['id']}", headers=owner).status_code == 404

        with ctx.sessions.begin() as session:  # as if the GPTQ build were still running
            session.execute(
                update(models.JobRecord).where(models.JobRecord.id == uuid.UUID(gptq["id"])).values(state="running")
            )
        assert client.delete(f"/v1/jobs/{job_id}", headers=owner).status_code == 409
        with ctx.sessions.begin() as session:
            session.execute(
                update(models.JobRecord).where(models.JobRecord.id == uuid.UUID(gptq["id"])).values(state="succeeded")
            )
        assert client.delete(f"/v1/jobs/{job_id}", headers=owner).status_code == 204
        for path in (
            f"/v1/builds/{build['id']}",
            f"/v1/builds/{failing['id']}",
            f"/v1/artifacts/{built['artifact']['id']}",
        ):
            assert client.get(path, headers=owner).status_code == 404, path
        with ctx.sessions() as session:
            assert (
                session.scalars(select(models.JobRecord)).all() == []
                and session.scalars(select(models.BuildRecord)).all() == []
            )
            profiles = session.scalars(select(models.ProfileRecord.sha256)).all()
        assert profiles and sorted(ctx.storage.blobs()) == sorted(profiles)  # the tars went; the cached profile stays


def test_a_build_needs_a_succeeded_job_its_point_and_a_known_method_and_target(tmp_path):
    with running_app(Settings(data_dir=tmp_path / "data", worker_threads=0, reaper_seconds=3600)) as (client, ctx):
        owner, other = bearer(ctx, "owner"), bearer(ctx, "other")
        job_id = client.post("/v1/jobs", json=job_body(), headers=owner).json()["id"]
        response = client.post(f"/v1/jobs/{job_id}/points/1/artifact", json={"method": "rtn"}, headers=owner)
        assert response.status_code == 409 and "job is queued" in response.json()["detail"]
        response = client.post(f"/v1/jobs/{job_id}/points/1/artifact", json={"method": "awq"}, headers=owner)
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "method"]
        response = client.post(f"/v1/jobs/{job_id}/points/1/artifact", json={"target": "onnx"}, headers=owner)
        assert response.status_code == 422 and response.json()["detail"][0]["loc"] == ["body", "target"]
        response = client.post(f"/v1/jobs/{job_id}/points/1/artifact", json={"colour": "blue"}, headers=owner)
        assert response.status_code == 422
        with ctx.sessions.begin() as session:  # succeeded, yet point 1 is not in its (missing) front
            session.execute(
                update(models.JobRecord).where(models.JobRecord.id == uuid.UUID(job_id)).values(state="succeeded")
            )
        assert client.post(f"/v1/jobs/{job_id}/points/1/artifact", headers=owner).status_code == 404
        assert client.post(f"/v1/jobs/{job_id}/points/1/artifact", headers=other).status_code == 404
        assert client.post(f"/v1/jobs/{uuid.uuid4()}/points/1/artifact", headers=owner).status_code == 404
        assert client.get(f"/v1/builds/{uuid.uuid4()}", headers=owner).status_code == 404
        assert client.get(f"/v1/builds/{job_id}", headers=owner).status_code == 404  # a job is not a build


def test_the_tar_is_the_same_bytes_for_the_same_files(tmp_path):
    first, second = tmp_path / "a" / "artifact", tmp_path / "b" / "artifact"
    for folder in (first, second):
        (folder / "tokenizer").mkdir(parents=True)
        (folder / "weights.safetensors").write_bytes(b"w" * 1000)
        (folder / "tokenizer" / "vocab.json").write_text("{}")
    os.utime(second / "weights.safetensors", (0, 1_000_000))
    builds.pack(first, tmp_path / "a.tar")
    builds.pack(second, tmp_path / "b.tar")
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()
    with tarfile.open(tmp_path / "a.tar") as tar:
        assert tar.getnames() == [
            "artifact",
            "artifact/tokenizer",
            "artifact/tokenizer/vocab.json",
            "artifact/weights.safetensors",
        ]


@pytest.mark.integration
@pytest.mark.slow
def test_build_on_postgres_and_rq(queued_settings, tmp_path, monkeypatch, zoo):
    """PostgreSQL + RQ: the API enqueues the build, a real RQ worker runs it; a canceled build is
    not live, so asking again queues a new one."""
    with running_app(queued_settings) as (client, ctx):
        owner = bearer(ctx, "owner")
        job_id = client.post("/v1/jobs", json=job_body(), headers=owner).json()["id"]
        monkeypatch.setitem(worker._contexts, os.getpid(), ctx)
        SimpleWorker([ctx.queue.rq], connection=ctx.queue.redis).work(burst=True)
        point = chosen_point(client, owner, job_id)
        url = f"/v1/jobs/{job_id}/points/{point['id']}/artifact"

        first = client.post(url, json={"method": "rtn"}, headers=owner)
        assert first.status_code == 202 and first.json()["state"] == "queued" and ctx.queue.rq.count == 1
        canceled = client.post(f"/v1/builds/{first.json()['id']}/cancel", headers=owner)
        assert canceled.status_code == 202 and canceled.json()["state"] == "canceled"
        second = client.post(url, json={"method": "rtn"}, headers=owner)
        assert second.status_code == 202 and second.json()["id"] != first.json()["id"]
        assert client.post(url, json={"method": "rtn"}, headers=owner).json()["id"] == second.json()["id"]

        SimpleWorker([ctx.queue.rq], connection=ctx.queue.redis).work(burst=True)
        assert client.get(f"/v1/builds/{first.json()['id']}", headers=owner).json()["state"] == "canceled"
        build = client.get(f"/v1/builds/{second.json()['id']}", headers=owner).json()
        check_built(client, ctx, owner, build, point, tmp_path)
        assert client.post(f"/v1/builds/{build['id']}/cancel", headers=owner).status_code == 409


def download_tar(client, headers: dict, build: dict, out) -> list:
    """The build's tar, unpacked under ``out``: its one folder's files by name."""
    assert build["state"] == "succeeded", build
    response = client.get(f"/v1/artifacts/{build['artifact']['id']}", headers=headers)
    assert hashlib.sha256(response.content).hexdigest() == build["artifact"]["sha256"]
    with tarfile.open(fileobj=io.BytesIO(response.content)) as tar:
        tar.extractall(out, filter="data")
    (folder,) = out.iterdir()
    return folder


@pytest.mark.slow
@pytest.mark.skipif(llamacpp_tools.find() is None, reason="llama.cpp's tools are not built (bitalloc llamacpp build)")
def test_a_point_of_ggml_types_builds_as_a_gguf_that_holds_its_types(embedded_settings, tmp_path, zoo):
    from gguf import GGMLQuantizationType, GGUFReader

    from bitalloc.quant.gguf_names import gguf_name

    with running_app(embedded_settings) as (client, ctx):
        owner = bearer(ctx, "owner")
        job_id = client.post("/v1/jobs", json=job_body(formats=["q4_0", "q8_0"], budgets={"avg_bits": 6.0}),
                             headers=owner).json()["id"]
        wait_until_finished(client, owner, job_id)
        point = chosen_point(client, owner, job_id)
        url = f"/v1/jobs/{job_id}/points/{point['id']}/artifact"
        # gptq: llama-quantize --imatrix of the job's calibration set (the service gives the build its calibration)
        response = client.post(url, json={"target": "gguf", "method": "gptq"}, headers=owner)
        assert response.status_code == 202 and response.json()["target"] == "gguf"
        build = wait_for_build(client, owner, response.json()["id"])
        folder = download_tar(client, owner, build, tmp_path / "gguf")
    types = {t.name: GGMLQuantizationType(t.tensor_type).name for t in GGUFReader(folder / "model.gguf").tensors}
    assert {f"{gguf_name(unit)}.weight": fmt.upper() for unit, fmt in point["formats"].items()}.items() <= types.items()
    imatrix = {t.name for t in GGUFReader(folder / "imatrix.gguf").tensors}
    assert {f"{gguf_name(unit)}.weight.in_sum2" for unit in point["formats"]} <= imatrix
    assert set(point["formats"].values()) == {"q4_0", "q8_0"}  # the budget mixes both


@pytest.mark.slow
def test_a_point_builds_as_a_compressed_tensors_checkpoint_transformers_loads(embedded_settings, tmp_path, zoo):
    from transformers import AutoModelForCausalLM

    with running_app(embedded_settings) as (client, ctx):
        owner = bearer(ctx, "owner")
        job_id = client.post("/v1/jobs", json=job_body(formats=["int4_g32", "int8_g32"]), headers=owner).json()["id"]
        wait_until_finished(client, owner, job_id)
        point = chosen_point(client, owner, job_id)
        url = f"/v1/jobs/{job_id}/points/{point['id']}/artifact"
        response = client.post(url, json={"target": "compressed-tensors"}, headers=owner)
        assert response.status_code == 202
        build = wait_for_build(client, owner, response.json()["id"])
        folder = download_tar(client, owner, build, tmp_path / "ct")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model(torch.arange(1, 9)[None]).logits.isfinite().all()


def test_a_streamed_job_s_point_builds_block_by_block(embedded_settings, model_root, tmp_path):
    from transformers import AutoModelForCausalLM

    from bitalloc.quant.artifact import load_artifact

    settings = embedded_settings.model_copy(update={"model_roots": [model_root]})
    with running_app(settings) as (client, ctx):
        owner = bearer(ctx, "owner")
        body = job_body(model=str(model_root / "tiny"), stream=True, formats=["int4_g32", "int8_g32"])
        job_id = client.post("/v1/jobs", json=body, headers=owner).json()["id"]
        wait_until_finished(client, owner, job_id)
        point = chosen_point(client, owner, job_id)
        url = f"/v1/jobs/{job_id}/points/{point['id']}/artifact"
        built = wait_for_build(client, owner, client.post(url, json={"method": "gptq"}, headers=owner).json()["id"])
        folder = download_tar(client, owner, built, tmp_path / "streamed")
        manifest = json.loads((folder / "bitalloc_artifact.json").read_text())
        assert len(manifest["weights"]) == 3  # what lies outside the blocks, then each of the 2 blocks
        assert load_artifact(folder).module(torch.arange(1, 9)[None]).logits.isfinite().all()
        checkpoint = wait_for_build(client, owner, client.post(url, json={"target": "compressed-tensors"},
                                                               headers=owner).json()["id"])
        folder = download_tar(client, owner, checkpoint, tmp_path / "ct")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3  # a shard per block, written as it was read
    assert AutoModelForCausalLM.from_pretrained(folder)(torch.arange(1, 9)[None]).logits.isfinite().all()

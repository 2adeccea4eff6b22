"""GET /v1/exports and a point's configuration in every export format, through HTTP on a finished job."""

from __future__ import annotations

import hashlib
import json

import pytest
from compressed_tensors.quantization import QuantizationConfig
from service_helpers import bearer, job_body, running_app, wait_until_finished

from bitalloc.quant.export import list_exporters
from bitalloc.service.settings import Settings


def test_exports_are_listed_for_the_dashboard(tmp_path):
    with running_app(Settings(data_dir=tmp_path / "data", worker_threads=0, reaper_seconds=3600)) as (client, _):
        response = client.get("/v1/exports")
    assert response.status_code == 200 and response.json() == list_exporters()
    assert [e["name"] for e in response.json()] == ["json", "compressed-tensors", "gptqmodel", "llama.cpp"]


@pytest.mark.slow
def test_each_format_downloads_as_an_artifact_or_is_refused_with_a_422_naming_the_units(embedded_settings, zoo):
    with running_app(embedded_settings) as (client, ctx):
        headers = bearer(ctx)
        body = job_body(formats=["int4_g32_asym", "int8_g32"], budgets={"avg_bits": 6.0})
        job_id = client.post("/v1/jobs", json=body, headers=headers).json()["id"]
        assert wait_until_finished(client, headers, job_id)["state"] == "succeeded"
        points = client.get(f"/v1/jobs/{job_id}/front", headers=headers).json()["points"]
        smallest, largest = points[0]["id"], points[-1]["id"]  # every unit int4_g32_asym / every unit int8_g32

        def config(point: int, name: str):
            return client.get(f"/v1/jobs/{job_id}/points/{point}/config", params={"format": name}, headers=headers)

        downloads = {}
        for export in list_exporters():
            response = config(largest, export["name"])
            assert response.status_code == 200, response.text
            assert hashlib.sha256(response.content).hexdigest() == response.headers["X-Content-SHA256"]
            assert response.headers["content-type"].startswith(export["media_type"])
            stem, _, suffix = export["filename"].rpartition(".")
            disposition = response.headers["Content-Disposition"]
            assert disposition.startswith(f'attachment; filename="{stem}-{job_id.replace("-", "")[:8]}-{largest}.')
            assert disposition.endswith(f'.{suffix}"')
            downloads[export["name"]] = response
        assert config(largest, "gptqmodel").headers["X-Artifact-Id"] == downloads["gptqmodel"].headers["X-Artifact-Id"]

        document = downloads["json"].json()
        assert set(document["formats"].values()) == {"int8_g32"} and document["point_id"] == largest
        assert {"units", "tie_groups", "totals", "profile", "model", "budgets"} <= set(document)
        groups = QuantizationConfig.model_validate(downloads["compressed-tensors"].json()).config_groups
        assert [(g.weights.num_bits, g.weights.group_size) for g in groups.values()] == [(8, 32)]
        assert json.loads(downloads["gptqmodel"].content)["bits"] == 8
        assert b"--tensor-type '^blk\\.0\\.attn_q=q8_0'" in downloads["llama.cpp"].content

        artifacts = client.get(f"/v1/jobs/{job_id}/artifacts", headers=headers).json()
        stored = {a["sha256"]: a for a in artifacts if a["kind"] == "config"}
        assert {r.headers["X-Content-SHA256"] for r in downloads.values()} == set(stored)
        for response in downloads.values():
            artifact = stored[response.headers["X-Content-SHA256"]]
            assert client.get(f"/v1/artifacts/{artifact['id']}", headers=headers).content == response.content

        for name in ("compressed-tensors", "gptqmodel"):
            refused = config(smallest, name)
            assert refused.status_code == 422
            detail = refused.json()["detail"]
            assert "int4_g32_asym" in detail and "model.layers.0.self_attn.q_proj" in detail
        assert config(smallest, "llama.cpp").status_code == 200
        assert len(client.get(f"/v1/jobs/{job_id}/artifacts", headers=headers).json()) == len(artifacts) + 1
        assert tuple(config(largest, "onnx").json()["detail"][0]["loc"]) == ("query", "format")


@pytest.mark.slow
def test_a_stored_front_and_what_it_names_are_immutable_and_revalidate_with_304s(embedded_settings, zoo):
    from bitalloc.service.api import immutable

    with running_app(embedded_settings) as (client, ctx):
        headers, stranger = bearer(ctx), bearer(ctx, "stranger")
        job_id = client.post("/v1/jobs", json=job_body(), headers=headers).json()["id"]
        assert wait_until_finished(client, headers, job_id)["state"] == "succeeded"
        front = client.get(f"/v1/jobs/{job_id}/front", headers=headers)
        point = front.json()["points"][0]["id"]
        paths = [f"/v1/jobs/{job_id}/front", f"/v1/jobs/{job_id}/front?all_points=true",
                 f"/v1/jobs/{job_id}/points/{point}", f"/v1/jobs/{job_id}/units", f"/v1/jobs/{job_id}/baselines",
                 f"/v1/jobs/{job_id}/points/{point}/config?format=json"]
        etags = set()
        for path in paths:
            first = client.get(path, headers=headers)
            etag = first.headers["ETag"]
            etags.add(etag)
            assert first.status_code == 200 and first.headers["Cache-Control"] == "private, no-cache"
            immutable.BODIES._bodies.clear()  # rendered afresh, it is the same bytes
            assert client.get(path, headers=headers).content == first.content
            again = client.get(path, headers={**headers, "If-None-Match": f'"stale", {etag}'})
            assert again.status_code == 304 and again.content == b"" and again.headers["ETag"] == etag
            assert client.get(path, headers={**headers, "If-None-Match": '"stale"'}).status_code == 200
            # A cached body never reaches another token, even one that knows the ETag.
            assert client.get(path, headers={**stranger, "If-None-Match": etag}).status_code == 404
        assert len(etags) == len(paths)

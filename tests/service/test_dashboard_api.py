"""What the dashboard reads besides the front: units laid out for the heatmap, baselines, the page itself."""

from __future__ import annotations

import numpy as np
import pytest
from service_helpers import bearer, job_body, running_app, wait_until_finished

from bitalloc.pipeline.baselines import baseline_points
from bitalloc.quant.formats import get_format
from bitalloc.quant.profile import Profile
from bitalloc.quant.units import Unit
from bitalloc.search.baselines import FTYPES
from bitalloc.service.dashboard import CSP, STATIC
from bitalloc.service.dashboard.layout import format_bits, unit_columns
from bitalloc.service.settings import Settings


def profile_of(units: list[Unit], formats: list[str], allowed: np.ndarray | None = None) -> Profile:
    shape = (len(units), len(formats))
    error = np.arange(1, shape[0] * shape[1] + 1, dtype=float).reshape(shape)
    nbytes = np.array([[u.numel * (f + 1) for f in range(len(formats))] for u in units], dtype=np.int64)
    return Profile(units, formats, error, nbytes, np.zeros(shape), np.ones(shape, bool) if allowed is None else allowed)


def test_columns_are_the_shortest_suffix_unique_in_the_block():
    units = [Unit(f"transformer.h.{b}.{name}", "weight", (8, 8), b)
             for b in (0, 1) for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    units += [Unit("kv.0.key", "kv_key", (2, 4), 0), Unit("kv.0.value", "kv_value", (2, 4), 0),
              Unit("lm_head", "weight", (8, 8), None)]
    columns = unit_columns(units)
    assert [columns[u.name] for u in units[:4]] == ["c_attn", "attn.c_proj", "c_fc", "mlp.c_proj"]
    assert columns["transformer.h.1.mlp.c_proj"] == "mlp.c_proj"
    assert (columns["kv.0.key"], columns["kv.0.value"], columns["lm_head"]) == ("K cache", "V cache", "lm_head")


def test_a_name_that_is_a_suffix_of_another_keeps_its_whole_name():
    columns = unit_columns([Unit("a.b", "weight", (8, 8), 0), Unit("x.a.b", "weight", (8, 8), 0)])
    assert columns == {"a.b": "a.b", "x.a.b": "x.a.b"}


def test_format_bits_include_scales_over_the_models_weights():
    profile = profile_of([Unit("w", "weight", (64, 64), 0), Unit("kv.0.key", "kv_key", (2, 4), 0)],
                         ["int4_g32", "int8_g32", "bf16"])
    bits = {row["name"]: (row["bits"], row["bits_per_weight"]) for row in format_bits(profile)}
    assert bits == {"int4_g32": (4, 4.5), "int8_g32": (8, 8.5), "bf16": (16, 16.0)}


def test_uniform_baselines_skip_formats_some_unit_does_not_allow():
    units = [Unit("a", "weight", (4, 4), 0), Unit("b", "weight", (4, 4), 0)]
    allowed = np.array([[True, True, True], [True, False, True]])
    points = baseline_points(profile_of(units, ["int2_g32", "int4_g32", "int8_g32"], allowed))
    assert [p["name"] for p in points] == ["uniform int2_g32", "uniform int8_g32"]
    assert points[0] == {"name": "uniform int2_g32", "kind": "uniform", "avg_bits": 8.0, "bytes": 32,
                         "error": 1.0 + 4.0, "latency": 0.0, "measured_kl": None}


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("dashboard") / "data", heartbeat_seconds=0.3,
                        lease_seconds=30, reaper_seconds=3600)
    with running_app(settings) as (client, ctx):
        headers = bearer(ctx, "a")
        job = client.post("/v1/jobs", json=job_body(kv_cache={"context": 64}), headers=headers).json()
        assert wait_until_finished(client, headers, job["id"])["state"] == "succeeded"
        yield client, ctx, headers, job["id"]


def test_units_lay_out_every_unit_of_the_profile(finished_job):
    client, _, headers, job_id = finished_job
    body = client.get(f"/v1/jobs/{job_id}/units", headers=headers).json()
    front = client.get(f"/v1/jobs/{job_id}/front", headers=headers).json()
    assert len(body["units"]) == front["profile"]["units"]
    assert [f["name"] for f in body["formats"]] == front["profile"]["formats"]
    q = next(u for u in body["units"] if u["name"] == "model.layers.1.self_attn.q_proj")
    assert (q["kind"], q["block"], q["column"], q["numel"]) == ("weight", 1, "q_proj", q["shape"][0] * q["shape"][1])
    assert {u["column"] for u in body["units"] if u["kind"] != "weight"} == {"K cache", "V cache"}


def test_baselines_sit_on_the_same_axes_as_the_front(finished_job):
    client, _, headers, job_id = finished_job
    points = client.get(f"/v1/jobs/{job_id}/baselines", headers=headers).json()["points"]
    front = client.get(f"/v1/jobs/{job_id}/front", headers=headers).json()
    assert [p["name"] for p in points] == [f"uniform {f}" for f in front["profile"]["formats"]]
    smallest = points[0]
    assert smallest["bytes"] == min(p["bytes"] for p in front["points"])  # the front starts at all-int2
    assert smallest["error"] == pytest.approx(max(p["error"] for p in front["points"]))


def test_units_and_baselines_belong_to_the_jobs_token_and_need_a_front(finished_job):
    client, ctx, headers, job_id = finished_job
    other = bearer(ctx, "b")
    for path in ("units", "baselines"):
        assert client.get(f"/v1/jobs/{job_id}/{path}", headers=other).status_code == 404
        assert client.get(f"/v1/jobs/{job_id}/{path}").status_code == 401


def test_a_job_without_a_front_is_a_409(tmp_path):
    with running_app(Settings(data_dir=tmp_path / "data", worker_threads=0, reaper_seconds=3600)) as (client, ctx):
        headers = bearer(ctx)
        job = client.post("/v1/jobs", json=job_body(), headers=headers).json()
        response = client.get(f"/v1/jobs/{job['id']}/units", headers=headers)
        assert response.status_code == 409 and "queued" in response.json()["detail"]


def test_the_page_and_its_files_are_served_locally(finished_job):
    client = finished_job[0]
    assert client.get("/", follow_redirects=False).headers["location"] == "/dashboard"
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-security-policy"] == CSP
    assert "/dashboard/static/app.js" in page.text and "http" not in page.text.replace("http-equiv", "")
    for name in sorted(path.name for path in STATIC.iterdir()):
        response = client.get(f"/dashboard/static/{name}")
        assert response.status_code == 200, name
        assert "http://" not in response.text.replace("http://www.w3.org/2000/svg", "") and "https://" not in response.text


def test_llamacpp_mixes_are_drawn_for_gguf_named_weights_only():
    units = [Unit(f"model.layers.{b}.{name}", "weight", (64, 256), b)
             for b in range(4) for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")]
    formats = ["int2_g32", "int3_g32", "int4_g32", "int5_g32", "int6_g32", "int8_g32"]
    profile = profile_of(units, formats)
    profile.bytes[:] = [[get_format(f).nbytes(u.shape) for f in formats] for u in units]
    points = baseline_points(profile)
    mixes = {p["name"]: p for p in points if p["kind"] == "llama.cpp"}
    assert set(mixes) == {f"llama.cpp {t}" for t in FTYPES}
    assert mixes["llama.cpp Q4_K_M"]["avg_bits"] > mixes["llama.cpp Q4_K_S"]["avg_bits"]  # more bits for attn_v/ffn_down
    anonymous = [Unit("conv", "weight", (8, 9), None)]
    assert all(p["kind"] == "uniform" for p in baseline_points(profile_of(anonymous, formats)))

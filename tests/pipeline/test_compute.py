"""A job's compute device, dtype and streaming, from the CLI, the REST schema and ``run_job``."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from bitalloc.pipeline import JobSpec, run_job
from bitalloc.pipeline.steps import Workspace
from bitalloc.quant.loading import LoadPolicy
from bitalloc.quant.profile import Profile
from bitalloc.quant.stream import load_within
from bitalloc.search import Budgets
from bitalloc.service.cli import app
from bitalloc.service.schemas import JobCreate

FORMATS = ["int2_g32", "int4_g32", "int8_g32"]


@pytest.fixture(scope="module")
def sharded(tiny_llama, tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharded")
    tiny_llama.module.save_pretrained(folder, max_shard_size="100KB")
    tiny_llama.tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def cli(tmp_path, monkeypatch):
    monkeypatch.setenv("BITALLOC_DATA_DIR", str(tmp_path / "data"))
    from bitalloc.service.settings import get_settings

    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def spec(model: str, **overrides) -> JobSpec:
    base = dict(model=model, formats=FORMATS, metric="output_mse", budgets=Budgets(max_avg_bits=5.0), points=6,
                seq_len=32, samples=4, eval_windows=2, device="cpu")
    return JobSpec(**{**base, **overrides})


def test_a_spec_refuses_a_bad_device_or_memory_cap():
    with pytest.raises(ValueError, match="device 'gpu': choose auto, cpu, cuda or cuda:N"):
        spec("factory:tiny-llama", device="gpu")
    with pytest.raises(ValueError, match="max_memory must be a positive number of bytes"):
        spec("factory:tiny-llama", max_memory=0)


def test_the_rest_schema_reads_device_and_memory_and_keeps_hardware_apart():
    job = JobCreate(model="zoo:llm", formats=["int4_g128"], device="cuda:1", max_memory="24GiB", hardware="a100")
    made = job.to_spec()
    assert (made.device, made.max_memory, made.hardware, made.stream) == ("cuda:1", 24 * 2**30, "a100", False)
    for bad, words in [({"device": "gpu"}, "String should match pattern"), ({"device": "h100"}, '"hardware": "h100"'),
                       ({"max_memory": "lots"}, "size 'lots'")]:
        with pytest.raises(ValueError, match=words):
            JobCreate(model="zoo:llm", formats=["int4_g128"], **bad)


@pytest.mark.slow
def test_a_streamed_job_equals_the_whole_one_and_says_where_it_computed(sharded, tmp_path, zoo):
    whole = run_job(spec(str(sharded)), profile_dir=tmp_path)
    streamed = run_job(spec(str(sharded), stream=True, shards=2), profile_dir=tmp_path)
    assert whole.compute == {"device": "cpu", "dtype": "float32", "streamed": False}
    assert streamed.compute == {"device": "cpu", "dtype": "float32", "streamed": True}
    assert streamed.summary()["compute"] == streamed.compute and streamed.profile.meta["streamed"]
    np.testing.assert_allclose(streamed.profile.error, whole.profile.error, rtol=1e-4, atol=0)
    assert streamed.chosen.formats == whole.chosen.formats
    for figure in ("kl", "perplexity", "top1", "reference_perplexity"):  # the held-out evaluation streams too
        assert streamed.evaluation[figure] == pytest.approx(whole.evaluation[figure], rel=1e-5), figure


@pytest.mark.slow
def test_a_streamed_accuracy_target_finds_the_whole_model_s_point(sharded, tmp_path, zoo):
    target = dict(budgets=Budgets(), measured_kl=2e-3, fitness_windows=2, evaluation=None)
    whole = run_job(spec(str(sharded), **target), profile_dir=tmp_path)
    streamed = run_job(spec(str(sharded), stream=True, **target), profile_dir=tmp_path)
    assert streamed.chosen.formats == whole.chosen.formats
    assert streamed.chosen.measured == pytest.approx(whole.chosen.measured, rel=1e-4)


def test_a_streamed_job_refuses_what_runs_the_whole_model(sharded, tmp_path, zoo):
    with pytest.raises(ValueError, match="metric 'fisher' walks the whole model"):
        run_job(spec(str(sharded), metric="fisher", stream=True, shards=2), profile_dir=tmp_path)


def test_a_streamed_nncf_baseline_is_the_whole_model_s(sharded, tmp_path, zoo):
    nncf = dict(baseline="nncf:int2_g32/int8_g32", budgets=Budgets(max_avg_bits=4.0), evaluation=None)
    whole = run_job(spec(str(sharded), **nncf), profile_dir=tmp_path)
    streamed = run_job(spec(str(sharded), stream=True, **nncf), profile_dir=tmp_path)
    assert streamed.chosen.formats == whole.chosen.formats
    assert len(set(whole.chosen.formats.values())) == 2


@pytest.mark.slow
def test_a_streamed_gptq_job_targets_and_evaluates_as_the_whole_one(sharded, tmp_path, zoo):
    """GPTQ's measured steps and its held-out evaluation sum the Hessians block by block."""
    target = dict(method="gptq", budgets=Budgets(), measured_kl=2e-3, fitness_windows=2)
    whole = run_job(spec(str(sharded), **target), profile_dir=tmp_path)
    streamed = run_job(spec(str(sharded), stream=True, **target), profile_dir=tmp_path)
    assert streamed.chosen.formats == whole.chosen.formats
    assert streamed.chosen.measured == pytest.approx(whole.chosen.measured, rel=1e-3)
    assert streamed.evaluation["kl"] == pytest.approx(whole.evaluation["kl"], rel=1e-3)


def test_cli_profile_streams_under_a_memory_cap_and_refuses_cuda_without_it(sharded, cli, tmp_path, monkeypatch):
    out = tmp_path / "p.npz"
    done = cli.invoke(app, ["profile", "--model", str(sharded), "--metric", "output_mse", "--formats", ",".join(FORMATS),
                            "--samples", "2", "--seq-len", "16", "--device", "cpu", "--max-memory", "100KB",
                            "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert "cpu, float32, streamed" in done.output and Profile.load(out).meta["streamed"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    refused = cli.invoke(app, ["profile", "--model", str(sharded), "--device", "cuda", "--out", str(out)])
    assert refused.exit_code == 1 and "torch sees no CUDA device" in refused.output
    refused = cli.invoke(app, ["run", "--model", str(sharded), "--max-memory", "lots", "--out", str(tmp_path / "r")])
    assert refused.exit_code == 1 and "size 'lots'" in refused.output
    summary = tmp_path / "run"
    done = cli.invoke(app, ["run", "--model", str(sharded), "--metric", "output_mse", "--formats", ",".join(FORMATS),
                            "--avg-bits", "5", "--samples", "2", "--seq-len", "16", "--points", "4", "--stream",
                            "--out", str(summary)])
    assert done.exit_code == 0, done.output
    assert json.loads((summary / "summary.json").read_text())["compute"]["streamed"] is True


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_streamed_descent_takes_the_whole_model_s_steps(sharded, tmp_path, zoo, method):
    """Descent's KL gradient streams block by block: the same steps, the same measured point."""
    descent = dict(metric="fisher_mse", descend=2, fitness_windows=2, gradient_windows=2, evaluation=None,
                   method=method)
    whole = run_job(spec(str(sharded), **descent), profile_dir=tmp_path)
    streamed = run_job(spec(str(sharded), stream=True, **descent), profile_dir=tmp_path)
    assert streamed.chosen.formats == whole.chosen.formats
    assert streamed.chosen.measured == pytest.approx(whole.chosen.measured, rel=1e-4)


def test_a_streamed_model_caches_quantized_cells_within_its_share_of_the_memory_cap(sharded, tmp_path):
    streamed = load_within(str(sharded), LoadPolicy(), dtype=torch.float32, device=torch.device("cpu"),
                           max_memory=4 * 2**20)
    work = Workspace(None, streamed, streamed.units(), None, None, tmp_path, print)  # type: ignore[arg-type]
    cell = torch.ones(512, 1024)  # 2 MiB: more than the 1 MiB share, so it is computed again when asked again
    calls = []
    for _ in range(2):
        work.weights.get(("unit", "int4_g32", "rtn"), lambda: calls.append(1) or cell)
    assert len(calls) == 2
    small = torch.ones(16, 16)
    for _ in range(2):
        work.weights.get(("small", "int4_g32", "rtn"), lambda: calls.append(1) or small)
    assert len(calls) == 3

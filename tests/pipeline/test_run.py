import json

import pytest
import torch
from typer.testing import CliRunner

from bitalloc.pipeline import JobSpec, run_job
from bitalloc.pipeline.problem import problem_of
from bitalloc.quant.kv import KVOptions
from bitalloc.quant.profile import Profile
from bitalloc.search import Budgets, InfeasibleBudget, solve
from bitalloc.service.cli import app

FORMATS = ["int2_g32", "int4_g32", "int8_g32"]


def spec(**overrides) -> JobSpec:
    base = dict(model="factory:tiny-llama", formats=FORMATS, budgets=Budgets(max_avg_bits=5.0), points=8,
                seq_len=32, samples=4, eval_windows=2)
    return JobSpec(**{**base, **overrides})


def test_run_job_matches_search_on_the_stored_profile(tmp_path, zoo):
    result = run_job(spec(), profile_dir=tmp_path)
    assert not result.profile_cached
    direct = solve(problem_of(result.profile), spec().budgets, solver="dp")
    assert result.chosen.formats == direct.formats and result.chosen.avg_bits <= 5.0
    assert len(result.front) >= 2
    assert result.evaluation["kl"] > 0 and result.evaluation["tokens"] == 2 * 31
    assert result.evaluation["bytes"] == result.chosen.bytes  # the summary's size is known, never null
    assert result.evaluation["avg_bits"] == pytest.approx(result.chosen.avg_bits)
    again = run_job(spec(), profile_dir=tmp_path)
    assert again.profile_cached and again.chosen.formats == result.chosen.formats


def test_infeasible_budget_names_the_smallest_achievable_value(tmp_path, zoo):
    with pytest.raises(InfeasibleBudget, match="avg"):
        run_job(spec(budgets=Budgets(max_avg_bits=1.0)), profile_dir=tmp_path)


def test_bad_budgets_and_formats_are_named(tmp_path):
    with pytest.raises(ValueError, match="max_avg_bits must be finite"):
        spec(budgets=Budgets(max_avg_bits=float("nan")))
    with pytest.raises(ValueError, match="measured_kl asks for the smallest allocation that meets it: give it alone, "
                                         "without max_avg_bits=5"):
        spec(measured_kl=0.1)
    with pytest.raises(ValueError, match="measured_kl must be a positive finite KL"):
        spec(budgets=Budgets(), measured_kl=float("inf"))
    with pytest.raises(ValueError, match="format 'int7_g32': integer widths"):
        run_job(spec(formats=["int7_g32"]), profile_dir=tmp_path)


@pytest.mark.parametrize("overrides", [
    {},
    {"budgets": Budgets(max_bytes=4096, max_avg_bits=5.5, max_latency=1e-3, max_error=0.25), "kv": KVOptions(1024, 2),
     "bos": True, "max_memory": 2**30, "stream": True, "calibration": "zoo:calibration", "evaluation": None,
     "method": "gptq", "descend": 2, "surrogate": 1, "refine": 3, "ties": False, "dtype": "bf16", "device": "cpu"},
    {"budgets": Budgets(), "measured_kl": 0.05},
], ids=["defaults", "everything-set", "accuracy-target"])
def test_a_spec_survives_its_json_round_trip(overrides):
    """What the service stores for the worker (through JSON) runs as the very spec it was made from."""
    original = spec(**overrides)
    data = json.loads(json.dumps(original.to_dict()))
    assert data == original.to_dict()
    assert data["budgets"] == {"max_bytes": original.budgets.max_bytes, "max_avg_bits": original.budgets.max_avg_bits,
                               "max_latency": original.budgets.max_latency, "max_error": original.budgets.max_error}
    assert data["kv"] == (None if original.kv is None else {"context": original.kv.context, "batch": original.kv.batch})
    rebuilt = JobSpec.from_dict(data)
    assert rebuilt == original and isinstance(rebuilt.budgets, Budgets)
    assert original.kv is None or isinstance(rebuilt.kv, KVOptions)


@pytest.mark.parametrize("change, message", [
    ({"colour": "blue"}, r"job spec has unknown keys \['colour'\]"),
    ({"budgets": {"max_bits": 4}}, r"budgets has unknown keys \['max_bits'\]"),
    ({"kv": {"context": 8, "heads": 2}}, r"kv has unknown keys \['heads'\]"),
    ({"kv": [8, 1]}, "kv must be a mapping"),
    ({"descend": -1}, "descend must be 0"),
    ({"measured_kl": 0.1}, "measured_kl asks for the smallest allocation"),
], ids=["unknown", "unknown-budget", "unknown-kv", "kv-list", "post-init", "target-with-budgets"])
def test_a_stored_spec_that_is_not_one_is_refused_by_name(change, message):
    with pytest.raises(ValueError, match=message):
        JobSpec.from_dict({**spec().to_dict(), **change})


def test_a_stored_spec_without_its_model_names_what_it_lacks():
    without_model = {key: value for key, value in spec().to_dict().items() if key != "model"}
    with pytest.raises(ValueError, match=r"job spec lacks the keys \['model'\]"):
        JobSpec.from_dict(without_model)


def test_cli_profile_solve_front_and_run(tmp_path, zoo, monkeypatch):
    monkeypatch.setenv("BITALLOC_DATA_DIR", str(tmp_path / "data"))
    from bitalloc.service.settings import get_settings

    get_settings.cache_clear()
    runner = CliRunner()
    profile = tmp_path / "p.npz"
    done = runner.invoke(app, ["profile", "--model", "factory:tiny-llama", "--formats", ",".join(FORMATS),
                               "--samples", "4", "--seq-len", "32", "--out", str(profile)])
    assert done.exit_code == 0, done.output
    alloc = tmp_path / "alloc.json"
    done = runner.invoke(app, ["solve", "--profile", str(profile), "--avg-bits", "4.5", "--out", str(alloc)])
    assert done.exit_code == 0, done.output
    assert json.loads(alloc.read_text())["avg_bits"] <= 4.5
    front = tmp_path / "front.json"
    done = runner.invoke(app, ["front", "--profile", str(profile), "--points", "6", "--out", str(front)])
    assert done.exit_code == 0 and len(json.loads(front.read_text())["allocations"]) >= 2
    done = runner.invoke(app, ["solve", "--profile", str(profile), "--avg-bits", "0.5", "--out", str(alloc)])
    assert done.exit_code == 1 and "error:" in done.output
    out = tmp_path / "run"
    done = runner.invoke(app, ["run", "--model", "factory:tiny-llama", "--formats", ",".join(FORMATS), "--avg-bits", "5",
                               "--samples", "4", "--seq-len", "32", "--eval-windows", "2", "--points", "6", "--out", str(out)])
    assert done.exit_code == 0, done.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["chosen"]["avg_bits"] <= 5 and Profile.load(out / "profile.npz").meta["metric"] == "fisher_mse"
    baseline = tmp_path / "baseline"
    done = runner.invoke(app, ["run", "--model", "factory:tiny-llama", "--formats", ",".join(FORMATS), "--samples", "4",
                               "--seq-len", "32", "--eval-windows", "2", "--points", "6", "--baseline",
                               "llama.cpp:Q4_K_M", "--out", str(baseline)])
    assert done.exit_code == 0, done.output
    assert json.loads((baseline / "allocation.json").read_text())["solver"].startswith("llamacpp")
    done = runner.invoke(app, ["run", "--model", "factory:tiny-llama", "--formats", ",".join(FORMATS), "--baseline",
                               "hawq_v3", "--samples", "4", "--seq-len", "32", "--out", str(baseline)])
    assert done.exit_code == 1 and "avg_bits budget" in done.output
    get_settings.cache_clear()


def test_calibration_and_evaluation_text_must_not_overlap(tmp_path, zoo):
    text = tmp_path / "same.txt"
    text.write_text("The same words calibrate and evaluate here. " * 200)
    with pytest.raises(ValueError, match="share 1 document"):
        run_job(spec(calibration=str(text), evaluation=str(text)), profile_dir=tmp_path)


def test_cli_build_and_generate_an_artifact(tmp_path, zoo):
    from bitalloc.quant.loading import load_model
    from bitalloc.quant.units import enumerate_units

    units = enumerate_units(load_model("factory:tiny-llama").module).weights
    alloc = tmp_path / "alloc.json"
    alloc.write_text(json.dumps({"formats": {u.name: ("int4_g32" if i % 2 else "int8_g32") for i, u in enumerate(units)}}))
    runner = CliRunner()
    out = tmp_path / "artifact"
    done = runner.invoke(app, ["build", "--model", "factory:tiny-llama", "--allocation", str(alloc), "--out", str(out)])
    assert done.exit_code == 0, done.output
    assert (out / "bitalloc_artifact.json").exists() and f"-> {out}" in done.output
    refused = runner.invoke(app, ["build", "--model", "factory:tiny-llama", "--allocation", str(alloc),
                                  "--out", str(tmp_path / "other"), "--target", "onnx"])
    assert refused.exit_code == 1 and "--target 'onnx': choose one of bitalloc, gguf, compressed-tensors" in refused.output
    if not torch.cuda.is_available():
        refused = runner.invoke(app, ["build", "--model", "factory:tiny-llama", "--allocation", str(alloc),
                                      "--out", str(tmp_path / "other"), "--device", "cuda"])
        assert refused.exit_code == 1 and "no CUDA device" in refused.output
    done = runner.invoke(app, ["generate", "--artifact", str(out), "--prompt", "The nation", "--max-new-tokens", "3"])
    assert done.exit_code == 0 and done.output.startswith("The nation"), done.output
    done = runner.invoke(app, ["generate", "--artifact", str(tmp_path / "missing"), "--prompt", "x"])
    assert done.exit_code == 1 and "error:" in done.output


def test_a_budget_that_does_not_bind_is_said_as_soon_as_it_is_known(tmp_path, zoo):
    heard = []
    loose = run_job(spec(budgets=Budgets(max_avg_bits=99.0), evaluation=None), profile_dir=tmp_path,
                    notify=heard.append)
    assert len(heard) == 1 and "does not bind" in heard[0] and loose.notes == heard
    assert set(loose.chosen.formats.values()) == {"int8_g32"}  # the most accurate allocation of these formats
    assert loose.summary()["notes"] == heard
    tight = run_job(spec(evaluation=None), profile_dir=tmp_path, notify=heard.append)
    assert tight.notes == [] and len(heard) == 1


@pytest.mark.parametrize("args, message", [
    (["--formats", "int7_g128", "--avg-bits", "5"], "integer widths are"),
    (["--formats", "int4_g128", "--avg-bits", "4", "--measured-kl", "0.1"], "give it alone"),
])
def test_the_cli_refuses_bad_arguments_before_importing_the_models_libraries(args, message, tmp_path):
    """Run as a user runs it (a fresh process): the refusal comes before transformers, the solvers
    and the pipeline are imported, which is what makes it fast."""
    import subprocess
    import sys
    from pathlib import Path

    probe = ("import sys\nfrom bitalloc.service.cli import app\n"
             "try:\n    app(sys.argv[1:])\nexcept SystemExit as stop:\n"
             "    heavy = [m for m in ('transformers', 'ortools', 'optuna', 'scipy.stats', 'bitalloc.pipeline.run') if m in sys.modules]\n"
             "    print('HEAVY', heavy)\n    raise\n")
    script = tmp_path / "probe.py"
    script.write_text(probe)
    out = subprocess.run([sys.executable, str(script), "run", "--model", "zoo:llm", *args, "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, cwd=Path(tmp_path))
    assert out.returncode == 1 and message in out.stderr
    assert "HEAVY []" in out.stdout


def test_a_job_runs_in_bf16_and_says_so(tmp_path, zoo):
    result = run_job(spec(dtype="bf16"), profile_dir=tmp_path)
    assert result.profile.meta["dtype"] == "bfloat16" and result.summary()["profile"]["dtype"] == "bfloat16"
    assert result.chosen.avg_bits <= 5.0 and result.evaluation["kl"] >= 0
    fp32 = run_job(spec(), profile_dir=tmp_path)
    assert not fp32.profile_cached and fp32.profile.meta["key"] != result.profile.meta["key"]

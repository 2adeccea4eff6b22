"""The solve phase's other ways to pick the point: a named baseline, a measured KL target,
measured refinement; and their validation at the API's edge."""

import numpy as np
import pytest
from pydantic import ValidationError

from bitalloc.pipeline import JobSpec, run_job
from bitalloc.pipeline.baselines import model_info, unit_infos
from bitalloc.pipeline.problem import problem_of
from bitalloc.search import Budgets, baselines
from bitalloc.service.schemas import JobCreate

FORMATS = ["int2_g32", "int4_g32", "int8_g32"]


def spec(**overrides) -> JobSpec:
    base = dict(model="factory:tiny-llama", formats=FORMATS, budgets=Budgets(max_avg_bits=5.0), points=6,
                seq_len=32, samples=4, eval_windows=2, fitness_windows=2)
    return JobSpec(**{**base, **overrides})


def test_a_named_baseline_is_the_chosen_point(tmp_path, zoo):
    result = run_job(spec(baseline="llama.cpp:Q4_K_M", budgets=Budgets()), profile_dir=tmp_path)
    problem = problem_of(result.profile)
    units = result.profile.units
    expected = baselines.llamacpp(problem, unit_infos(units), "Q4_K_M", model_info(units))
    assert result.chosen.formats == expected.formats and result.chosen.solver == expected.solver
    assert result.evaluation is not None and result.evaluation["kl"] >= 0

    mixed = run_job(spec(baseline="layers:int2_g32/int8_g32", budgets=Budgets(max_avg_bits=6.0)), profile_dir=tmp_path)
    assert mixed.chosen.avg_bits <= 6.0
    assert set(mixed.chosen.formats.values()) == {"int2_g32", "int8_g32"}


def test_hawq_and_nncf_baselines_meet_their_target(tmp_path, zoo):
    for name in ("hawq_v3", "nncf:int2_g32/int8_g32"):
        result = run_job(spec(baseline=name, budgets=Budgets(max_avg_bits=4.5), evaluation=None), profile_dir=tmp_path)
        assert result.chosen.avg_bits <= 4.5
        assert len(set(result.chosen.formats.values())) >= 2, name


def test_measured_kl_budget_returns_an_allocation_that_meets_it_by_measurement(tmp_path, zoo):
    loose = run_job(spec(budgets=Budgets(), measured_kl=1e-3, evaluation=None), profile_dir=tmp_path)
    assert loose.chosen.measured is not None
    # held to the upper bound over the fitness windows, which lies above their mean
    assert loose.chosen.measured < loose.chosen.info["measured_bound"] <= 1e-3
    cheaper = run_job(spec(budgets=Budgets(), measured_kl=10.0, evaluation=None), profile_dir=tmp_path)
    assert cheaper.chosen.bytes <= loose.chosen.bytes


def test_refinement_is_never_worse_than_its_start_by_its_own_measure(tmp_path, zoo):
    result = run_job(spec(refine=3, evaluation=None), profile_dir=tmp_path)
    assert result.chosen.solver == "refine"
    assert result.chosen.measured <= result.chosen.info["start_measured"]
    assert result.chosen.avg_bits <= 5.0


def test_descent_then_refinement_keep_the_size_and_never_measure_worse(tmp_path, zoo):
    start = run_job(spec(evaluation=None), profile_dir=tmp_path).chosen
    descended = run_job(spec(descend=2, evaluation=None), profile_dir=tmp_path).chosen
    assert descended.solver == "descent" and descended.bytes <= start.bytes
    assert descended.measured <= descended.info["start_measured"]
    both = run_job(spec(descend=1, refine=2, evaluation=None), profile_dir=tmp_path).chosen
    assert both.solver == "refine" and both.bytes <= start.bytes
    assert both.measured <= both.info["start_measured"]


@pytest.mark.slow  # HAWQ-V3's Hessian traces, its seed, take most of it
def test_the_surrogate_step_completes_within_the_size_and_never_measures_worse(tmp_path, zoo):
    result = run_job(spec(surrogate=2, fitness_windows=4), profile_dir=tmp_path)
    chosen = result.chosen
    assert chosen.solver == "surrogate" and chosen.avg_bits <= 5.0  # the job's budget, which the start meets too
    assert chosen.measured <= chosen.info["start_measured"]
    assert chosen.info["evaluations"] >= 2 and result.evaluation["kl"] >= 0
    assert JobCreate(model="factory:tiny-llama", formats=["int4_g32"], surrogate=3).to_spec().surrogate == 3

    # another budget of the same profile and fitness windows fits on what the first measured
    assert result.measured is not None and result.measured.parent == tmp_path
    with np.load(result.measured) as data:
        kept = {tuple(c): v for c, v in zip(data["choices"].tolist(), data["values"])}
    assert len(kept) == chosen.info["evaluations"] and all(len(v) == 4 for v in kept.values())
    smaller = run_job(spec(surrogate=2, fitness_windows=4, budgets=Budgets(max_avg_bits=4.0), evaluation=None),
                      profile_dir=tmp_path)
    assert smaller.chosen.info["reused"] == len(kept) and smaller.chosen.avg_bits <= 4.0
    assert smaller.measured == result.measured
    with np.load(smaller.measured) as data:
        assert len(data["choices"]) == len(kept) + smaller.chosen.info["evaluations"]
        again = {tuple(c): v for c, v in zip(data["choices"].tolist(), data["values"])}
    assert all(np.array_equal(again[c], v) for c, v in kept.items())  # never measured again


@pytest.mark.parametrize("fields, message", [
    ({"baseline": "llama.cpp:Q9_K"}, "unknown llama.cpp type"),
    ({"baseline": "layers:int4_g32"}, "LOW/HIGH"),
    ({"baseline": "uniform:int6_g32"}, "not among formats"),
    ({"baseline": "hawq_v3"}, "give budgets.avg_bits"),
    ({"baseline": "magic"}, "expected one of"),
    ({"budgets": {"measured_kl": 0.1, "avg_bits": 4}}, "give it alone"),
    ({"budgets": {"kl": 0.1}, "metric": "output_mse"}, "KL units"),
    ({"descend": 2, "metric": "output_mse"}, "KL units"),
    ({"descend": 21}, "less than or equal to 20"),
    ({"surrogate": -1}, "greater than or equal to 0"),
])
def test_bad_choices_are_refused_naming_the_field(fields, message):
    with pytest.raises(ValidationError, match=message):
        JobCreate(model="factory:tiny-llama", formats=["int4_g32", "int8_g32"], **fields)


def test_gptq_jobs_refine_and_evaluate_with_the_same_quantizer(tmp_path, zoo):
    result = run_job(spec(method="gptq", refine=1), profile_dir=tmp_path)
    assert result.profile.meta["method"] == "gptq"
    assert result.chosen.measured <= result.chosen.info["start_measured"]
    assert result.evaluation is not None and result.evaluation["kl"] > 0


def test_untied_jobs_drop_the_tie_groups_and_never_predict_worse(tmp_path, zoo):
    tied = run_job(spec(evaluation=None), profile_dir=tmp_path)
    untied = run_job(spec(evaluation=None, ties=False), profile_dir=tmp_path)
    assert tied.profile.tie_groups and untied.chosen.avg_bits <= 5.0
    assert untied.chosen.error <= tied.chosen.error + 1e-12  # a relaxation of the same problem
    assert JobCreate(model="factory:tiny-llama", formats=["int4_g32"], ties=False).to_spec().ties is False


def test_the_recipe_is_the_job_s_steps_with_its_parameters():
    from bitalloc.pipeline.steps import Baseline, Descend, Refine, Solve, Surrogate, Target, recipe

    assert recipe(spec(descend=3, refine=2)) == [Solve(Budgets(max_avg_bits=5.0), "dp"), Descend(3), Refine(2)]
    assert recipe(spec(budgets=Budgets(), measured_kl=0.1, surrogate=4)) == [Target(0.1), Surrogate(4)]
    assert [type(step) for step in recipe(spec(baseline="hawq_v3"))] == [Baseline]


def test_a_workspace_posing_another_problem_shares_what_it_measured(tmp_path, tiny_llama):
    from bitalloc.pipeline.steps import Workspace
    from bitalloc.quant.calibration import calibration_for
    from bitalloc.quant.formats import parse_formats
    from bitalloc.quant.profile import build_profile

    units = tiny_llama.units()
    calibration = calibration_for(tiny_llama, "zoo:calibration", seq_len=32, count=2)
    profile = build_profile(tiny_llama, units, parse_formats(FORMATS), "output_mse", calibration)
    work = Workspace(spec(), tiny_llama, units, calibration, problem_of(profile), tmp_path, lambda message: None)
    untied = work.with_problem(problem_of(profile, ties=False))
    assert untied.problem.tie_groups == () and work.problem.tie_groups
    work.fitness  # noqa: B018  (measured on the tied workspace first)
    assert work.with_problem(untied.problem).fitness is work.fitness

"""greedy, nsga2 and optuna: always valid, never better than the optimum."""

from __future__ import annotations

import numpy as np
import optuna
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from search_instances import assert_valid, enumerate_allocations, problems, scalar_measure, small_model

from bitalloc.search import Allocation, Budgets, front, get_solver, solve
from bitalloc.search.pareto import non_dominated

optuna.logging.set_verbosity(optuna.logging.WARNING)
FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(problems(), st.data())
def test_greedy_is_valid_and_never_beats_the_optimum(problem, data) -> None:
    every = enumerate_allocations(problem)
    budgets = Budgets(max_bytes=int(every.bytes[data.draw(st.integers(0, len(every.choices) - 1))]))
    allocation = solve(problem, budgets, solver="greedy")
    assert_valid(problem, allocation, budgets)
    assert allocation.error >= every.error[every.meets(budgets)].min() - problem.tolerance("error")


@FAST
@given(problems(max_units=4, max_formats=3), st.sampled_from([("error", "bytes"), ("error", "bytes", "latency")]))
def test_nsga2_front_is_dominated_by_or_equal_to_the_exact_front(problem, axes) -> None:
    every = enumerate_allocations(problem)
    exact = np.column_stack([every.total(m) for m in axes])
    exact = exact[non_dominated(exact)]
    found = get_solver("nsga2", pop_size=12, generations=8).front(problem, axes)
    assert len(found) >= 1
    for allocation, point in zip(found, found.points()):
        assert_valid(problem, allocation, Budgets())
        # The point is a real allocation's totals, and some exact point is at least as good.
        assert np.any(np.all(np.isclose(np.column_stack([every.total(m) for m in axes]), point), axis=1))
        assert np.any(np.all(exact <= point + 1e-9, axis=1))


@FAST
@given(problems(max_units=4, max_formats=3), st.data())
def test_nsga2_and_optuna_answers_respect_budgets_and_never_beat_the_optimum(problem, data) -> None:
    every = enumerate_allocations(problem)
    budgets = Budgets(max_bytes=int(every.bytes[data.draw(st.integers(0, len(every.choices) - 1))]))
    optimum = every.error[every.meets(budgets)].min()
    for name, options in (("nsga2", {"pop_size": 12, "generations": 8}), ("optuna", {"n_trials": 15})):
        allocation = solve(problem, budgets, solver=name, **options)
        assert_valid(problem, allocation, budgets)
        assert allocation.error >= optimum - problem.tolerance("error")


def test_optuna_optimises_a_measured_objective_from_the_exact_start() -> None:
    problem = small_model()
    budgets = Budgets(max_avg_bits=5.0)
    exact = solve(problem, budgets, solver="dp")

    def evaluator(allocation: Allocation) -> float:  # disagrees with the proxy: prefers unit0 small
        return allocation.error + 50.0 * allocation.choice[0]

    found = solve(problem, budgets, solver="optuna", n_trials=40, measure=scalar_measure(evaluator))
    assert_valid(problem, found, budgets)
    assert found.measured == pytest.approx(evaluator(found))
    assert found.measured <= evaluator(exact)  # the exact answer was the first trial


def test_optuna_study_is_stored_and_resumed_at_a_storage_url(tmp_path) -> None:
    problem = small_model()
    url = f"sqlite:///{tmp_path / 'study.db'}"
    options = {"n_trials": 5, "storage": url, "study_name": "resume"}
    solve(problem, Budgets(max_avg_bits=5.0), solver="optuna", **options)
    solve(problem, Budgets(max_avg_bits=5.0), solver="optuna", **options)
    assert len(optuna.load_study(study_name="resume", storage=url).trials) == 10


def test_optuna_front_with_a_measure_is_a_measured_front() -> None:
    problem = small_model()
    measured = front(problem, solver="optuna", sampler="nsga2", n_trials=30, measure=scalar_measure(lambda a: 2 * a.error))
    assert measured.axes == ("measured", "bytes")
    assert all(a.measured == pytest.approx(2 * a.error) for a in measured)


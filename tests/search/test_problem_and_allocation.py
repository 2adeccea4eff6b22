"""Problem validation, budgets, and allocations as JSON."""

from __future__ import annotations

import json

import numpy as np
import pytest
from search_instances import small_model

from bitalloc.search import SOLVERS, Allocation, Budgets, Problem, SearchError, get_solver, register, solve
from bitalloc.search.solver import Solver


def arrays(**changes):
    base = dict(
        error=np.array([[1.0, 0.5], [2.0, 0.1], [3.0, 0.2]]),
        bytes=np.array([[10, 20], [10, 20], [5, 40]]),
        numel=np.array([20, 20, 40]),
        unit_names=["a", "b", "c"],
        format_names=["int4", "int8"],
    )
    base.update(changes)
    return base


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"bytes": np.ones((3, 3), int)}, "bytes"),
        ({"error": np.array([[1.0, np.nan], [2.0, 0.1], [3.0, 0.2]])}, "error"),
        ({"latency": np.ones((2, 2))}, "latency"),
        ({"bytes": np.array([[10.5, 20], [10, 20], [5, 40]])}, "bytes"),
        ({"bytes": np.array([[-1, 20], [10, 20], [5, 40]])}, "bytes"),
        ({"numel": np.array([20, 0, 40])}, "numel"),
        ({"unit_names": ["a", "a", "c"]}, "unit_names"),
        ({"format_names": ["int4"]}, "format_names"),
        ({"allowed": np.array([[True, True], [False, False], [True, True]])}, "allowed"),
        ({"tie_groups": [[0, 7]]}, "tie_groups"),
        ({"tie_groups": [[0, 1]], "allowed": np.array([[True, False], [False, True], [True, True]])}, "tie_groups"),
        ({"fixed": {0: 5}}, "fixed"),
        ({"fixed": {9: 0}}, "fixed"),
        ({"fixed": {0: 1}, "allowed": np.array([[True, False], [True, True], [True, True]])}, "fixed"),
        ({"fixed": {0: 0, 1: 1}, "tie_groups": [[0, 1]]}, "fixed"),
    ],
)
def test_bad_input_raises_value_error_naming_the_field(changes, field) -> None:
    with pytest.raises(ValueError, match=field):
        Problem(**arrays(**changes))


def test_nan_is_fine_where_a_format_is_not_allowed() -> None:
    problem = Problem(**arrays(error=np.array([[1.0, np.nan], [2.0, 0.1], [3.0, 0.2]]), allowed=np.array([[True, False], [True, True], [True, True]])))
    assert solve(problem).choice[0] == 0


@pytest.mark.parametrize(("budget", "value"), [("max_bytes", -1), ("max_avg_bits", float("nan")), ("max_latency", "fast"), ("max_bytes", 1.5)])
def test_bad_budgets_raise_naming_the_field(budget, value) -> None:
    with pytest.raises(ValueError, match=budget):
        Budgets(**{budget: value})


def test_latency_budgets_need_a_latency_table() -> None:
    with pytest.raises(ValueError, match="latency"):
        solve(Problem(**arrays()), Budgets(max_latency=1.0))


def test_ties_and_fixed_units_are_respected_by_every_exact_solver() -> None:
    problem = Problem(**arrays(tie_groups=[[0, 1]], fixed={2: 1}))
    for name in ("dp", "ilp", "greedy"):
        choice = solve(problem, Budgets(max_bytes=60), solver=name).choice
        assert choice[0] == choice[1] and choice[2] == 1


def test_average_bits_budget_equal_to_a_reported_average_is_met() -> None:
    problem = small_model()
    for allocation in (solve(problem, Budgets(max_avg_bits=b)) for b in (3.0, 5.5, 9.0)):
        again = solve(problem, Budgets(max_avg_bits=allocation.avg_bits))
        assert again.avg_bits <= allocation.avg_bits and again.error <= allocation.error


def test_allocation_round_trips_through_json_by_name() -> None:
    problem = small_model()
    allocation = solve(problem, Budgets(max_avg_bits=6.0))
    data = json.loads(json.dumps(allocation.to_dict()))
    assert data["formats"] == {u: problem.format_names[f] for u, f in zip(problem.unit_names, allocation.choice)}
    restored = Allocation.from_dict(data, problem)
    assert restored == allocation


@pytest.mark.parametrize("edit", [lambda d: d["formats"].pop("layer0"), lambda d: d["formats"].update(layer0="fp3")])
def test_allocation_from_another_profile_is_refused(edit) -> None:
    problem = small_model()
    data = solve(problem).to_dict()
    edit(data)
    with pytest.raises(ValueError, match="formats"):
        Allocation.from_dict(data, problem)


def test_solvers_are_chosen_by_name_and_unknown_names_list_the_known_ones() -> None:
    with pytest.raises(ValueError, match="dp.*greedy.*ilp"):
        get_solver("simplex")
    with pytest.raises(ValueError, match="buckets"):
        get_solver("ilp", buckets=4)


def test_single_budget_solvers_refuse_two_budgets_and_point_to_ilp() -> None:
    problem = Problem(**arrays(latency=np.ones((3, 2))))
    with pytest.raises(ValueError, match="ilp"):
        solve(problem, Budgets(max_bytes=60, max_latency=5.0), solver="dp")


def test_a_registered_solver_is_checked_like_the_built_in_ones(monkeypatch) -> None:
    monkeypatch.setattr("bitalloc.search.registry.SOLVERS", dict(SOLVERS))

    @register
    class Dearest(Solver):
        """Breaks the budget on purpose: the template must refuse its answer."""

        name = "test-dearest"

        def _solve(self, problem, budgets, objective):
            return Allocation.of(problem, problem.bytes.argmax(axis=1))

    with pytest.raises(SearchError, match="invalid allocation"):
        solve(Problem(**arrays()), Budgets(max_bytes=60), solver="test-dearest")


def test_an_error_budget_alone_asks_for_the_fewest_bytes() -> None:
    assert Budgets(max_error=0.1).objective() == "bytes"
    assert Budgets(max_error=0.1, max_avg_bits=4.0).objective() == "error"
    assert Budgets(max_avg_bits=4.0).objective() == "error"
    assert Budgets(max_avg_bits=4.0, max_bytes=10).given() == {"max_bytes": 10, "max_avg_bits": 4.0}

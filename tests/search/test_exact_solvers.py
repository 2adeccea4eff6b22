"""ilp and dp against brute force on random small problems."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from search_instances import Enumerated, assert_valid, enumerate_allocations, medium_problems, problems

from bitalloc.search import Budgets, InfeasibleBudget, solve
from bitalloc.search.sweep import budget_range

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def problem_and_budget(draw: st.DrawFn, kinds: tuple[str, ...]) -> tuple:
    """A problem and one budget of a drawn kind, set from a valid allocation's
    total (so it is feasible) or between two of them."""
    problem = draw(problems())
    every = enumerate_allocations(problem)
    kind = draw(st.sampled_from(kinds))
    metric = {"max_bytes": "bytes", "max_avg_bits": "avg_bits", "max_latency": "latency", "max_error": "error"}[kind]
    totals = every.total(metric)
    limit = totals[draw(st.integers(0, len(totals) - 1))]
    if draw(st.booleans()):
        limit = (limit + totals[draw(st.integers(0, len(totals) - 1))]) / 2
    limit = int(limit) if kind == "max_bytes" else float(limit)
    return problem, every, Budgets(**{kind: max(limit, 0)})


def best(every: Enumerated, budgets: Budgets, objective: str, slack: dict | None = None) -> float:
    ok = every.meets(budgets, slack)
    return every.total(objective)[ok].min() if ok.any() else np.inf


@FAST
@given(problem_and_budget(("max_bytes", "max_avg_bits", "max_latency")))
def test_ilp_and_dp_find_the_least_error_within_a_budget(case: tuple) -> None:
    problem, every, budgets = case
    optimum = best(every, budgets, "error")
    exact = solve(problem, budgets, solver="ilp")
    assert_valid(problem, exact, budgets)
    assert exact.error <= optimum + problem.tolerance("error")
    table = solve(problem, budgets, solver="dp")
    assert_valid(problem, table, budgets)
    resource, slack = table.info["resource"], table.info["slack"]
    assert table.error <= best(every, budgets, "error", {resource: slack}) + problem.tolerance("error")
    if resource == "bytes":  # small byte ranges fit the table at one byte per column: exact
        assert table.info["optimal"] and table.error <= optimum + problem.tolerance("error")


@FAST
@given(problem_and_budget(("max_error",)), st.sampled_from(["bytes", "latency"]))
def test_ilp_and_dp_find_the_least_size_within_an_error_target(case: tuple, objective: str) -> None:
    problem, every, budgets = case
    optimum = best(every, budgets, objective)
    for solver in ("ilp", "dp"):
        allocation = solve(problem, budgets, solver=solver, objective=objective)
        assert_valid(problem, allocation, budgets)
        assert allocation.value(objective) <= optimum + problem.tolerance(objective)


@FAST
@given(problem_and_budget(("max_bytes",)), st.integers(1, 4))
def test_coarse_dp_is_within_its_stated_slack(case: tuple, buckets: int) -> None:
    problem, every, budgets = case
    allocation = solve(problem, budgets, solver="dp", buckets=buckets)
    assert_valid(problem, allocation, budgets)
    slack = allocation.info["slack"]
    assert allocation.info["optimal"] == (slack == 0)
    # No better than the optimum within the budget, no worse than the optimum within budget - slack.
    assert allocation.error >= best(every, budgets, "error") - problem.tolerance("error")
    assert allocation.error <= best(every, budgets, "error", {"bytes": slack}) + problem.tolerance("error")


@FAST
@given(problems(), st.data())
def test_ilp_handles_several_budgets_at_once(problem, data) -> None:
    every = enumerate_allocations(problem)
    pick = lambda: int(data.draw(st.integers(0, len(every.choices) - 1)))  # noqa: E731
    budgets = Budgets(max_bytes=int(every.bytes[pick()]), max_latency=float(every.latency[pick()]))
    ok = every.meets(budgets)
    if not ok.any():
        with pytest.raises(InfeasibleBudget):
            solve(problem, budgets, solver="ilp")
        return
    allocation = solve(problem, budgets, solver="ilp")
    assert_valid(problem, allocation, budgets)
    assert allocation.error <= every.error[ok].min() + problem.tolerance("error")


@FAST
@given(problems(), st.sampled_from(["max_bytes", "max_avg_bits", "max_latency", "max_error"]), st.sampled_from(["ilp", "dp", "greedy"]))
def test_an_infeasible_budget_raises_with_the_smallest_achievable_value(problem, kind: str, solver: str) -> None:
    every = enumerate_allocations(problem)
    metric = {"max_bytes": "bytes", "max_avg_bits": "avg_bits", "max_latency": "latency", "max_error": "error"}[kind]
    smallest = every.total(metric).min()
    objective = "bytes" if kind == "max_error" else "error"
    assert_valid(problem, solve(problem, Budgets(**{kind: smallest if kind != "max_bytes" else int(smallest)}), solver=solver, objective=objective), Budgets())
    below = smallest - 1 if kind == "max_bytes" else smallest * (1 - 1e-6) - 1e-6
    if below < 0:
        return
    with pytest.raises(InfeasibleBudget) as raised:
        solve(problem, Budgets(**{kind: below}), solver=solver, objective=objective)
    assert raised.value.budget == kind
    assert raised.value.smallest == pytest.approx(smallest, rel=1e-9, abs=1e-9)
    assert "smallest achievable" in str(raised.value)


@FAST
@given(problems(structure=False), st.data())
def test_ilp_reports_jointly_infeasible_budgets_with_the_least_value_under_the_others(problem, data) -> None:
    every = enumerate_allocations(problem)
    max_bytes = int(every.bytes[data.draw(st.integers(0, len(every.choices) - 1))])
    within = every.bytes <= max_bytes
    least_latency = every.latency[within].min()
    if least_latency <= every.latency.min() + 1e-6:
        return  # the bytes cap does not raise the least latency: nothing jointly infeasible to probe
    max_latency = (least_latency + every.latency.min()) / 2
    with pytest.raises(InfeasibleBudget) as raised:
        solve(problem, Budgets(max_bytes=max_bytes, max_latency=max_latency), solver="ilp")
    assert raised.value.budget == "max_latency"
    assert raised.value.smallest == pytest.approx(least_latency, rel=1e-9, abs=1e-9)
    assert "together with max_bytes" in str(raised.value)


@FAST
@given(medium_problems(), st.floats(0.0, 1.0), st.sampled_from(["max_bytes", "max_latency"]))
def test_dp_matches_ilp_where_brute_force_cannot_reach(problem, where: float, kind: str) -> None:
    metric = "bytes" if kind == "max_bytes" else "latency"
    lo, hi = budget_range(problem, "error", metric)
    limit = lo + where * (hi - lo)
    budgets = Budgets(**{kind: int(limit) if metric == "bytes" else limit})
    table = solve(problem, budgets, solver="dp")
    assert_valid(problem, table, budgets)
    exact = solve(problem, budgets, solver="ilp")
    if exact.info["optimal"]:  # CP-SAT proved it: the DP can be no better
        assert table.error >= exact.error - 2 * problem.tolerance("error")
    else:  # CP-SAT's time limit came first (a loaded machine): its answer is feasible, so no better than the DP's
        assert table.error <= exact.error + 2 * problem.tolerance("error")
    tighter = limit - table.info["slack"] if metric == "latency" else int(limit) - table.info["slack"]
    if tighter >= lo:  # below the cheapest allocation the guarantee says nothing
        assert table.error <= solve(problem, Budgets(**{kind: tighter}), solver="ilp").error + 2 * problem.tolerance("error")


@FAST
@given(medium_problems(), st.floats(0.0, 1.0), st.integers(8, 256))
def test_coarse_dp_matches_ilp_within_its_slack(problem, where: float, buckets: int) -> None:
    lo, hi = budget_range(problem, "error", "bytes")
    budgets = Budgets(max_bytes=int(lo + where * (hi - lo)))
    table = solve(problem, budgets, solver="dp", buckets=buckets)
    assert_valid(problem, table, budgets)
    tighter = budgets.max_bytes - int(table.info["slack"])
    if tighter >= lo:  # below the cheapest allocation the guarantee says nothing
        assert table.error <= solve(problem, Budgets(max_bytes=tighter), solver="ilp").error + 2 * problem.tolerance("error")

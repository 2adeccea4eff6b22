"""Accuracy-target mode: the smallest allocation whose error meets a target."""

from __future__ import annotations

from typing import Any

from search.allocation import Allocation
from search.budgets import Budgets
from search.errors import InfeasibleBudget
from search.evaluators import Evaluator
from search.problem import Problem
from search.registry import get_solver
from search.sweep import budget_range


def smallest_within(
    problem: Problem,
    max_error: float,
    evaluator: Evaluator | None = None,
    solver: str = "dp",
    steps: int = 10,
    **options: Any,
) -> Allocation:
    """The smallest allocation whose error is at most ``max_error``.

    Predicted error (no ``evaluator``): one exact solve minimising bytes
    within ``max_error`` (see the solver's guarantee).

    Measured error: bisection over the byte budget between the cheapest and
    the most accurate allocation. Each step solves for the least predicted
    error within the budget and measures it; ``steps`` measurements narrow
    the budget to 2**-steps of that range. The answer always meets the
    target by measurement; it is the smallest such under the assumption that
    measured error falls as the budget grows (true of the proxy optimum in
    general, not guaranteed for every model). Raises InfeasibleBudget, with
    the best measured error, if even the most accurate allocation misses the
    target.
    """
    exact = get_solver(solver, **options)
    if evaluator is None:
        return exact.solve(problem, Budgets(max_error=max_error), objective="bytes")

    def measured_at(max_bytes: int) -> tuple[Allocation, float]:
        allocation = exact.solve(problem, Budgets(max_bytes=max_bytes))
        measured = float(evaluator(allocation))
        return allocation.with_measured(measured), measured

    lo, hi = (int(b) for b in budget_range(problem, "error", "bytes"))
    best, measured = measured_at(hi)
    if measured > max_error:
        raise InfeasibleBudget("max_error", max_error, measured)
    for _ in range(steps):
        if hi - lo <= 1:
            break
        allocation, measured = measured_at((lo + hi) // 2)
        if measured <= max_error:
            best, hi = allocation, allocation.bytes
        else:
            lo = (lo + hi) // 2
    return best

"""Is each budget achievable at all, and if not, what is?

Checked before any solver runs, so an infeasible budget is reported with the
exact smallest achievable value instead of surfacing as a solver failure.
A single budget is decided exactly here: the least total of one additive
metric takes each group's least option. Budgets that are each achievable but
not together are decided by the exact solvers (see ``search.solvers.ilp``).
"""

from __future__ import annotations

import numpy as np

from bitalloc.search.allocation import Allocation
from bitalloc.search.budgets import Budgets, Metric
from bitalloc.search.errors import InfeasibleBudget
from bitalloc.search.problem import Problem


def extreme_allocation(problem: Problem, metric: Metric, tiebreak: Metric, solver: str = "") -> Allocation:
    """The allocation with the least ``metric``, ties broken by least ``tiebreak``.

    E.g. ``("bytes", "error")`` is the cheapest allocation and
    ``("error", "bytes")`` the most accurate (the dearest worth having).
    """
    groups = problem.groups
    primary = groups.sum(problem.integer(metric))
    secondary = groups.sum(problem.integer(tiebreak))
    group_choice = np.empty(groups.count, dtype=np.int64)
    for g in range(groups.count):
        options = groups.options(g)
        group_choice[g] = options[np.lexsort((secondary[g, options], primary[g, options]))[0]]
    return Allocation.of(problem, groups.expand(group_choice, problem.n_units), solver=solver)


def check_budgets(problem: Problem, budgets: Budgets) -> None:
    """Raise :class:`InfeasibleBudget` for the first budget no allocation meets."""
    for budget, metric in (("max_bytes", "bytes"), ("max_avg_bits", "bytes"), ("max_latency", "latency"), ("max_error", "error")):
        limit = getattr(budgets, budget)
        if limit is None:
            continue
        least = extreme_allocation(problem, metric, "bytes" if metric != "bytes" else "error")
        if budget == "max_avg_bits":
            cap = Budgets(max_avg_bits=limit).byte_cap(problem.total_numel)
        else:
            cap = problem.integer_cap(metric, limit)
        if problem.integer_total(least.choice, metric) > cap:
            smallest = least.avg_bits if budget == "max_avg_bits" else least.value(metric)
            raise InfeasibleBudget(budget, limit, smallest)


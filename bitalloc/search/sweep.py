"""Front sweep: solve the exact problem at many budgets, keep what is not dominated."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from bitalloc.search.allocation import Allocation
from bitalloc.search.budgets import Budgets, Metric
from bitalloc.search.errors import InfeasibleBudget
from bitalloc.search.feasibility import extreme_allocation
from bitalloc.search.front import Front
from bitalloc.search.problem import Problem

SolveFn = Callable[[Problem, Budgets, Metric], Allocation]
"""``Solver.solve``: the best allocation for an objective within budgets, or ``InfeasibleBudget``."""


def budget_range(problem: Problem, objective: Metric, swept: Metric) -> tuple[float, float]:
    """From the allocation cheapest in ``swept`` to the one best in
    ``objective``: beyond that, a larger budget buys nothing."""
    return extreme_allocation(problem, swept, objective).value(swept), extreme_allocation(problem, objective, swept).value(swept)


def with_limit(budgets: Budgets, metric: Metric, limit: float) -> Budgets:
    """``budgets`` tightened so ``metric`` stays within ``limit``."""
    field = {"bytes": "max_bytes", "latency": "max_latency", "error": "max_error"}[metric]
    current = getattr(budgets, field)
    limit = int(limit) if metric == "bytes" else float(limit)
    return replace(budgets, **{field: limit if current is None else min(current, limit)})


def sweep(solve: SolveFn, problem: Problem, axes: tuple[Metric, ...], points: int, budgets: Budgets) -> Front:
    """Minimise ``axes[0]`` at evenly spaced budgets on the other axes (a
    grid of about ``points`` for three axes) and keep the non-dominated
    results; grid points no allocation can meet are skipped."""
    objective, swept = axes[0], axes[1:]
    per_axis = points if len(swept) == 1 else int(np.ceil(np.sqrt(points)))
    grids = []
    for metric in swept:
        lo, hi = budget_range(problem, objective, metric)
        grid = np.linspace(lo, hi, per_axis)
        grids.append(np.unique(np.floor(grid)) if metric == "bytes" else grid)
    found: dict[tuple[int, ...], Allocation] = {}
    for limits in itertools.product(*grids):
        limited = budgets
        for metric, limit in zip(swept, limits):
            limited = with_limit(limited, metric, limit)
        try:
            allocation = solve(problem, limited, objective)
        except InfeasibleBudget:
            continue
        found.setdefault(allocation.choice, allocation)
    return Front.of(found.values(), axes)

"""dp: exact dynamic programming over a discretised budget.

The problem is a multiple-choice knapsack over groups (tie groups merged into
super-units, see :mod:`search.groups`). A DP over every option of a
model-sized problem at byte resolution would need millions of columns, so:

1. the convex-hull greedy gives a feasible incumbent and the Lagrangian
   multiplier of the budget (:mod:`search.solvers.hull`);
2. the Lagrangian bound drops every option that no allocation better than
   the incumbent can use; few groups keep more than one option, and their
   size differences share a large divisor (2 KiB for Llama shapes);
3. a DP table over what is left (:mod:`search.solvers.table`) finds the
   best allocation; done twice, first over a smaller core to get a better
   incumbent cheaply, then over every option that could beat it.
"""

from __future__ import annotations

import numpy as np

from bitalloc.search.allocation import Allocation
from bitalloc.search.budgets import Budgets, Metric
from bitalloc.search.front import Front
from bitalloc.search.problem import Problem
from bitalloc.search.registry import register
from bitalloc.search.solvers.hull import HullPath, lagrangian_bound
from bitalloc.search.solvers.knapsack import Knapsack, KnapsackSolver
from bitalloc.search.solvers.table import KnapsackTable
from bitalloc.search.sweep import budget_range

# Share of the gap between the hull incumbent and the Lagrangian bound that
# sets the first, smaller DP's options. Measured on model-sized problems
# (bench/solvers.py): 0.25 makes the second DP small enough to cost little.
CORE_SHARE = 0.25


@register
class DPSolver(KnapsackSolver):
    """Exact multiple-choice-knapsack DP for one budget besides the objective.

    Takes: error within a byte, average-bits or latency cap; bytes or latency
    within an error cap (the accuracy-target direction); bytes and latency
    against each other. For several budgets at once use ``ilp``.

    Guarantee. Let R be the discretised metric (the budgeted one, or the
    objective when the budget is on error). Step 2 only drops options whose
    Lagrangian bound proves every allocation using them worse than the
    incumbent, so the last table holds every allocation that could be
    better. That table rounds each option's R up to a multiple of ``step``,
    which can add at most ``slack`` (reported in ``info``; less than
    groups x ``step``; 0 when ``step`` divides every remaining option
    difference, which ``info["optimal"]`` records). Hence:

    * the answer meets every budget: bytes exactly, latency and error
      within ``Problem.tolerance`` (1e-9 of their magnitude);
    * minimising error (or any value) within ``R <= B``: the answer is no
      worse than the true optimum within ``B - slack`` (and, being feasible,
      no better than the optimum within ``B``);
    * minimising R within ``max_error=E``: the answer meets E and its R is
      at most the true optimum plus ``slack``;
    * so with ``slack == 0`` it is the optimum, up to the 1e-9 integer
      scaling of error and latency.

    Cost: O(groups x formats) for steps 1-2, O(options kept x buckets) for
    step 3; ``buckets`` bounds the table width and memory.
    """

    name = "dp"

    def __init__(self, buckets: int = 2**20) -> None:
        if buckets < 1:
            raise ValueError(f"buckets must be >= 1, got {buckets}")
        self.buckets = buckets

    def _solve_on_path(self, problem: Problem, form: Knapsack, resource: np.ndarray, value: np.ndarray,
                       path: HullPath) -> Allocation:
        return self._allocation(problem, form, resource, value, path, form.cap)

    def _front(self, problem: Problem, axes: tuple[Metric, ...], points: int, budgets: Budgets) -> Front:
        """One exact solve per budget, sharing the hull path (the bound and
        table of each budget are small after step 2)."""
        objective, swept = axes[0], axes[-1]
        caps = problem.integer_caps(budgets)
        if len(axes) != 2 or set(caps) - {swept}:
            raise ValueError("solver 'dp' sweeps one budget on a two-axis front; use solver='ilp' for more")
        form = Knapsack.between(objective, swept)
        resource, value = form.tables(problem)
        path = HullPath.build(resource, value, problem.groups.allowed)
        lo, hi = budget_range(problem, objective, swept)
        limits = {problem.integer_cap(swept, limit) for limit in np.linspace(lo, hi, points)}
        found = [self._allocation(problem, form, resource, value, path, min(cap, caps.get(swept, cap))) for cap in sorted(limits)]
        return Front.of(found, axes)

    def _allocation(self, problem: Problem, form: Knapsack, resource: np.ndarray, value: np.ndarray, path: HullPath, cap: int) -> Allocation:
        """Steps 1-3 for one cap: hull incumbent, bound, then DP (twice)."""
        allowed = problem.groups.allowed
        if form.minimises_value:  # least value with resource <= cap
            objective, limited = value, resource
            incumbent = path.within(cap)
            weight = path.rate(path.steps_within(cap))
        else:  # least resource with value <= cap
            objective, limited = resource, value
            steps = path.steps_reaching(cap)
            incumbent = path.prefix(steps)
            weight = 1.0 / path.rate(steps - 1) if steps > 0 else 0.0
        bound, reduced = lagrangian_bound(objective, limited, allowed, weight, cap)

        def rank(choice: np.ndarray) -> tuple[int, int]:
            return _total(objective, choice), _total(limited, choice)

        # First a DP over the core (options within a fraction of the gap), whose
        # answer is usually the optimum; then the DP over every option that could
        # beat that answer, which proves it or finds the better one.
        for share in (CORE_SHARE, 1.0):
            threshold = bound + share * (rank(incumbent)[0] - bound)
            keep = allowed & (reduced <= threshold - bound + 1e-9 * (abs(bound) + abs(threshold)) + 1.0)
            table = KnapsackTable.build(resource, value, keep, self.buckets, cap=cap if form.minimises_value else None)
            found = table.within(cap) if form.minimises_value else table.least_with(cap)
            if found is not None and rank(found) < rank(incumbent):
                incumbent = found
        info = {
            "resource": form.resource,
            "step": problem.real(form.resource, table.step),
            "slack": problem.real(form.resource, table.slack),
            "optimal": table.slack == 0,
            "options_kept": int(keep.sum()),
        }
        return Allocation.of(problem, problem.groups.expand(incumbent, problem.n_units), solver=self.name, info=info)


def _total(table: np.ndarray, group_choice: np.ndarray) -> int:
    return int(table[np.arange(len(group_choice)), group_choice].sum())

"""greedy: Lagrangian / convex-hull marginal-gain allocation, the fast baseline."""

from __future__ import annotations

import numpy as np

from bitalloc.search.allocation import Allocation
from bitalloc.search.budgets import Budgets, Metric
from bitalloc.search.front import Front
from bitalloc.search.problem import Problem
from bitalloc.search.registry import register
from bitalloc.search.solvers.hull import HullPath
from bitalloc.search.solvers.knapsack import Knapsack, KnapsackSolver


@register
class GreedySolver(KnapsackSolver):
    """Convex-hull greedy for one budget besides the objective (like ``dp``).

    Takes upgrade steps in order of value saved per unit of resource while
    they fit (:class:`~search.solvers.hull.HullPath`). Always within the
    budget and never better than the optimum; points where the budget is used
    up exactly are optimal, between them it can be beaten (``dp`` and
    ``ilp`` close that gap; ``bench/solvers.py`` measures it).
    O(groups x formats x log) time.
    """

    name = "greedy"

    def _solve_on_path(self, problem: Problem, form: Knapsack, resource: np.ndarray, value: np.ndarray,
                       path: HullPath) -> Allocation:
        choice = path.within(form.cap) if form.minimises_value else path.prefix(path.steps_reaching(form.cap))
        return self._allocation(problem, choice)

    def _front(self, problem: Problem, axes: tuple[Metric, ...], points: int, budgets: Budgets) -> Front:
        """Points along the hull path itself: each is optimal for its own size."""
        if len(axes) != 2 or set(problem.integer_caps(budgets)) - {axes[1]}:
            raise ValueError("solver 'greedy' sweeps one budget on a two-axis front; use solver='ilp' for more")
        form = Knapsack.between(axes[0], axes[1])
        resource, value = form.tables(problem)
        path = HullPath.build(resource, value, problem.groups.allowed)
        steps = np.unique(np.linspace(0, len(path.group), points).round().astype(int))
        allocations = [self._allocation(problem, path.prefix(int(s))) for s in steps]
        return Front.of((a for a in allocations if not problem.violations(a.choice, budgets)), axes)

    def _allocation(self, problem: Problem, group_choice: np.ndarray) -> Allocation:
        return Allocation.of(problem, problem.groups.expand(group_choice, problem.n_units), solver=self.name)

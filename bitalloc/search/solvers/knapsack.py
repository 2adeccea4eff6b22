"""The single-budget form that dp and greedy solve.

A multiple-choice knapsack has one objective and one budget. With groups as
items and formats as choices, ``dp`` and ``greedy`` need the problem in that
shape: a ``resource`` they walk along (discretise or take hull steps on) and
a ``value`` they minimise along the way. Error stays the value whenever it is
involved, because its range spans orders of magnitude and discretising it
would lose the small errors users care about.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass

import numpy as np

from bitalloc.search.allocation import Allocation
from bitalloc.search.budgets import Budgets, Metric
from bitalloc.search.feasibility import extreme_allocation
from bitalloc.search.problem import Problem
from bitalloc.search.solver import Solver
from bitalloc.search.solvers.hull import HullPath


@dataclass(frozen=True)
class Knapsack:
    """Minimise ``objective`` with at most one other metric ``limited``.

    Without a limit, the answer is the objective's best allocation and the
    other role only breaks ties.

    ``resource``/``value`` are the two metrics in the roles the algorithms
    need; when the objective is the value (e.g. error within a byte cap) the
    answer is the least value at ``resource <= cap``; otherwise (e.g. bytes
    within an error cap) it is the least resource with ``value <= cap``.
    """

    objective: Metric
    resource: Metric
    value: Metric
    limited: Metric | None
    cap: int | None

    @classmethod
    def between(cls, objective: Metric, partner: Metric, cap: int | None = None, limited: bool = True) -> Knapsack:
        """Assign the roles: error is always the value if involved, else the
        limited partner is the resource (its cap is then met exactly)."""
        resource, value = (objective, partner) if partner == "error" else (partner, objective)
        return cls(objective, resource, value, partner if limited else None, cap)

    @property
    def minimises_value(self) -> bool:
        return self.objective == self.value

    @property
    def partner(self) -> Metric:
        """The metric besides the objective (the tie-break when unlimited)."""
        return self.resource if self.minimises_value else self.value

    def tables(self, problem: Problem) -> tuple[np.ndarray, np.ndarray]:
        """Per-group integer tables [G, F] of the resource and the value."""
        groups = problem.groups
        return groups.sum(problem.integer(self.resource)), groups.sum(problem.integer(self.value))


def as_knapsack(problem: Problem, budgets: Budgets, objective: Metric) -> Knapsack | str:
    """The knapsack form of a solve, or the reason there is none.

    Caps on the objective itself are already met (the feasibility check
    proved the objective's best allocation meets them) unless another budget
    forces a trade-off; that and any two budgets on different metrics need a
    solver for several constraints (``ilp``).
    """
    caps = problem.integer_caps(budgets)
    others = [m for m in caps if m != objective]
    if len(others) > 1 or (others and objective in caps):
        return f"it handles one budget besides the objective, got {budgets.describe()}; use solver='ilp'"
    if others:
        return Knapsack.between(objective, others[0], caps[others[0]])
    return Knapsack.between(objective, "bytes" if objective == "error" else "error", limited=False)


def exact_solver_name(problem: Problem, budgets: Budgets, objective: Metric) -> str:
    """``dp`` when the budgets fit the single-budget form, else ``ilp``: the exact solver to start from."""
    return "ilp" if isinstance(as_knapsack(problem, budgets, objective), str) else "dp"


class KnapsackSolver(Solver):
    """What ``dp`` and ``greedy`` share: the single-budget form and its hull path.

    Both take exactly the budgets :func:`as_knapsack` accepts and both start
    from the convex-hull path of the groups' options; they differ only in how
    they pick a point on (``greedy``) or beyond (``dp``) that path.
    """

    def unsupported(self, problem: Problem, budgets: Budgets, objective: Metric) -> str | None:
        form = as_knapsack(problem, budgets, objective)
        return form if isinstance(form, str) else None

    def _solve(self, problem: Problem, budgets: Budgets, objective: Metric) -> Allocation:
        form = as_knapsack(problem, budgets, objective)
        assert isinstance(form, Knapsack)
        if form.limited is None:
            return extreme_allocation(problem, form.objective, form.partner, solver=self.name)
        resource, value = form.tables(problem)
        path = HullPath.build(resource, value, problem.groups.allowed)
        return self._solve_on_path(problem, form, resource, value, path)

    @abstractmethod
    def _solve_on_path(self, problem: Problem, form: Knapsack, resource: np.ndarray, value: np.ndarray,
                       path: HullPath) -> Allocation:
        """The allocation for ``form``'s cap, given the hull path of its tables."""

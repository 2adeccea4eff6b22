"""The one interface every solver implements, and the checks they all share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import ClassVar

from bitalloc.search.allocation import Allocation
from bitalloc.search.budgets import METRICS, Budgets, Metric
from bitalloc.search.errors import SearchError
from bitalloc.search.feasibility import check_budgets
from bitalloc.search.front import Front, check_axes
from bitalloc.search.problem import Problem
from bitalloc.search.sweep import sweep


class Solver(ABC):
    """Finds allocations; options are constructor arguments (like pymoo's
    algorithms and Optuna's samplers), the problem and budgets are arguments
    of :meth:`solve`, so one configured solver serves many problems.

    :meth:`solve` is a template: it validates, rejects budgets this solver
    cannot handle, raises :class:`~search.errors.InfeasibleBudget` for a
    budget nothing can meet, runs :meth:`_solve`, and refuses any answer that
    breaks a budget, tie or fixed unit. Subclasses implement :meth:`_solve`
    and may override :meth:`unsupported` and :meth:`_front`.
    """

    name: ClassVar[str]

    def solve(self, problem: Problem, budgets: Budgets | None = None, objective: Metric = "error") -> Allocation:
        """The allocation minimising ``objective`` within ``budgets``."""
        budgets = budgets or Budgets()
        check_metrics(problem, budgets, [objective])
        reason = self.unsupported(problem, budgets, objective)
        if reason:
            raise ValueError(f"solver {self.name!r} cannot take these budgets: {reason}")
        check_budgets(problem, budgets)
        allocation = self._solve(problem, budgets, objective)
        broken = problem.violations(allocation.choice, budgets)
        if broken:
            raise SearchError(f"solver {self.name!r} produced an invalid allocation: {'; '.join(broken)}")
        return allocation

    def front(self, problem: Problem, axes: Sequence[Metric] = ("error", "bytes"), points: int = 64, budgets: Budgets | None = None) -> Front:
        """Non-dominated allocations along ``axes`` (the first is minimised
        at up to ``points`` budgets on the others), within ``budgets``."""
        axes = check_axes(axes)
        budgets = budgets or Budgets()
        check_metrics(problem, budgets, axes)
        if points < 2:
            raise ValueError(f"points must be >= 2, got {points}")
        check_budgets(problem, budgets)
        return self._front(problem, axes, points, budgets)

    def unsupported(self, problem: Problem, budgets: Budgets, objective: Metric) -> str | None:
        """Why this solver cannot take these budgets, or None if it can."""
        return None

    @abstractmethod
    def _solve(self, problem: Problem, budgets: Budgets, objective: Metric) -> Allocation: ...

    def _front(self, problem: Problem, axes: tuple[Metric, ...], points: int, budgets: Budgets) -> Front:
        return sweep(self.solve, problem, axes, points, budgets)


def check_metrics(problem: Problem, budgets: Budgets, metrics: Sequence[str]) -> None:
    """Objectives must be metrics the problem has; latency needs a table."""
    for metric in metrics:
        if metric not in METRICS:
            raise ValueError(f"objective must be one of {METRICS}, got {metric!r}")
        problem.values(metric)  # type: ignore[arg-type]
    if budgets.max_latency is not None and problem.latency is None:
        raise ValueError("max_latency: this problem has no latency table")

"""ilp: CP-SAT over one Boolean per (group, format), any budgets at once."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
from ortools.sat.python import cp_model

from bitalloc.search.allocation import Allocation
from bitalloc.search.budgets import Budgets, Metric
from bitalloc.search.errors import InfeasibleBudget, SearchError
from bitalloc.search.pareto import non_dominated
from bitalloc.search.problem import Problem
from bitalloc.search.registry import register
from bitalloc.search.solver import Solver

_FIELDS: dict[Metric, tuple[str, ...]] = {"bytes": ("max_bytes", "max_avg_bits"), "latency": ("max_latency",), "error": ("max_error",)}


@register
class ILPSolver(Solver):
    """Exact integer program solved by OR-Tools CP-SAT.

    One Boolean per group and allowed format, exactly one per group; each
    budget is a linear constraint and the objective a linear sum, all in the
    problem's integer scales (bytes exact; error and latency rounded per unit
    at 1e-9 of their magnitude, see :mod:`search.scaling`). So when CP-SAT
    proves optimality (``info["optimal"]``), the answer meets every budget
    (floats within ``Problem.tolerance``), no allocation meeting the budgets
    exactly is excluded, and its objective is within the objective's
    tolerance of the true optimum. ``info["bound"]`` is a proven lower bound
    on the true optimum; if ``time_limit`` stops CP-SAT first, the best
    allocation found is returned with ``optimal: False`` and that bound. Budgets that are each achievable but not together raise
    :class:`InfeasibleBudget` with the smallest value achievable under the
    others.
    """

    name = "ilp"

    def __init__(self, time_limit: float = 60.0, workers: int = 1, seed: int = 0) -> None:
        self.time_limit = time_limit
        self.workers = workers
        self.seed = seed

    def _solve(self, problem: Problem, budgets: Budgets, objective: Metric) -> Allocation:
        caps = problem.integer_caps(budgets)
        result = self._optimise(problem, objective, caps)
        if result is None:
            self._raise_jointly_infeasible(problem, budgets)
        choice, optimal, bound = result
        info = {"optimal": optimal, "bound": problem.real(objective, bound) - problem.tolerance(objective)}
        return Allocation.of(problem, problem.groups.expand(choice, problem.n_units), solver=self.name, info=info)

    def _optimise(self, problem: Problem, objective: Metric, caps: dict[Metric, int]) -> tuple[np.ndarray, bool, int] | None:
        """(group choice, proven optimal, objective bound), or None if infeasible."""
        groups = problem.groups
        metrics = [objective, *caps]
        tables = {m: groups.sum(problem.integer(m)) for m in metrics}
        options = [_undominated(np.flatnonzero(groups.allowed[g]), [tables[m][g] for m in metrics]) for g in range(groups.count)]
        offsets = {m: sum(int(tables[m][g, f].min()) for g, f in enumerate(options)) for m in metrics}

        model = cp_model.CpModel()
        variables = [[model.new_bool_var(f"g{g}f{f}") for f in fs] for g, fs in enumerate(options)]
        for group_vars in variables:
            model.add_exactly_one(group_vars)
        flat = [v for group_vars in variables for v in group_vars]

        def coefficients(metric: Metric) -> list[int]:
            table = tables[metric]
            return [int(table[g, f] - table[g, fs].min()) for g, fs in enumerate(options) for f in fs]

        for metric, cap in caps.items():
            model.add(cp_model.LinearExpr.weighted_sum(flat, coefficients(metric)) <= cap - offsets[metric])
        model.minimize(cp_model.LinearExpr.weighted_sum(flat, coefficients(objective)))

        solver = cp_model.CpSolver()
        solver.parameters.max_time_in_seconds = self.time_limit
        solver.parameters.num_workers = self.workers
        solver.parameters.random_seed = self.seed
        status = solver.solve(model)
        if status == cp_model.INFEASIBLE:
            return None
        if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
            raise SearchError(f"solver 'ilp' found no allocation within time_limit={self.time_limit}s ({solver.status_name(status)})")
        choice = np.array([fs[[solver.boolean_value(v) for v in vs].index(True)] for fs, vs in zip(options, variables)])
        return choice, status == cp_model.OPTIMAL, int(round(solver.best_objective_bound)) + offsets[objective]

    def _raise_jointly_infeasible(self, problem: Problem, budgets: Budgets) -> None:
        """Each budget alone is achievable (checked before solving), so find
        one that cannot hold under the others and say what it could be."""
        caps = problem.integer_caps(budgets)
        metric = list(caps)[-1]
        others = _without(budgets, metric)
        result = self._optimise(problem, metric, problem.integer_caps(others))
        if result is None:
            self._raise_jointly_infeasible(problem, others)
        least = Allocation.of(problem, problem.groups.expand(result[0], problem.n_units))
        field = next(f for f in _FIELDS[metric] if getattr(budgets, f) is not None and (metric != "bytes" or _binds(problem, budgets, f)))
        smallest = least.avg_bits if field == "max_avg_bits" else least.value(metric)
        raise InfeasibleBudget(field, getattr(budgets, field), smallest, others=others.describe())


def _undominated(formats: np.ndarray, rows: list[np.ndarray]) -> np.ndarray:
    """Drop formats another format matches or beats in every metric (keeping
    one of identical ones): the optimum never needs them."""
    return formats[non_dominated(np.stack([row[formats] for row in rows], axis=1))]


def _without(budgets: Budgets, metric: Metric) -> Budgets:
    return replace(budgets, **{f: None for f in _FIELDS[metric]})


def _binds(problem: Problem, budgets: Budgets, field: str) -> bool:
    """Whether this size budget is the one that sets the byte cap."""
    alone = Budgets(**{field: getattr(budgets, field)}).byte_cap(problem.total_numel)
    return alone == budgets.byte_cap(problem.total_numel)

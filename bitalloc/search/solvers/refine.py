"""refine: EvoPress-style evolutionary refinement by a measured objective.

The additive error of a profile is a proxy: the sum of per-unit errors is
not always monotone in the model's true loss (EvoPress). Starting from the
exact proxy optimum, this search swaps levels between groups (one up, one
down, so the size barely moves) within the budgets, and selects by the
measured objective in stages of growing sample counts: many candidates are
screened cheaply, few are measured carefully.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from bitalloc.search.allocation import Allocation
from bitalloc.search.budgets import Budgets, Metric
from bitalloc.search.front import Front
from bitalloc.search.measure import Measure, mean
from bitalloc.search.problem import Problem
from bitalloc.search.registry import get_solver, register
from bitalloc.search.solver import Solver
from bitalloc.search.solvers.knapsack import exact_solver_name


@register
class RefineSolver(Solver):
    """Evolutionary refinement of one allocation by a measured objective.

    ``measure(allocation, samples)`` measures window by window; the mean is compared (lower is
    better);
    ``schedule`` is the selection: ``((samples, keep), ...)`` with samples
    growing and the last keep 1 (EvoPress's multi-step selection). Each
    generation makes ``offspring`` children of the parent with 1 to
    ``max_swaps`` level swaps each; every stage measures the candidates left
    and keeps the best ``keep``, the parent always among the finalists.

    Never returns something worse than its start by the measure at the
    final stage's sample count, as long as the measure returns the same
    values for the same (allocation, samples): evaluations are cached, the
    parent competes in every final stage, and it is replaced only by a child
    that measures strictly better. The objective argument of :meth:`solve`
    only chooses the start (the exact solver's optimum for it, unless
    ``start`` is given); the search itself minimises the measurement.
    """

    name = "refine"

    def __init__(
        self,
        measure: Measure,
        start: Allocation | None = None,
        generations: int = 50,
        offspring: int = 16,
        schedule: Sequence[tuple[int, int]] = ((128, 8), (512, 2), (2048, 1)),
        max_swaps: int = 3,
        seed: int = 0,
    ) -> None:
        schedule = tuple((int(s), int(k)) for s, k in schedule)
        if not schedule or schedule[-1][1] != 1 or any(b[0] <= a[0] or b[1] > a[1] for a, b in zip(schedule, schedule[1:])):
            raise ValueError(f"schedule must grow in samples and shrink in keep down to 1, got {schedule}")
        self.measure = measure
        self.start = start
        self.generations = generations
        self.offspring = offspring
        self.schedule = schedule
        self.max_swaps = max_swaps
        self.seed = seed

    def _solve(self, problem: Problem, budgets: Budgets, objective: Metric) -> Allocation:
        return _Evolution(problem, budgets, self, starting_point(problem, budgets, objective, self.start)).run()


def starting_point(problem: Problem, budgets: Budgets, objective: Metric, start: Allocation | None) -> Allocation:
    """Where a measured search starts: ``start``, checked against the budgets and structure,
    or else the exact solver's optimum of the proxy ``objective``."""
    if start is None:
        return get_solver(exact_solver_name(problem, budgets, objective)).solve(problem, budgets, objective)
    broken = problem.violations(start.choice, budgets)
    if broken:
        raise ValueError(f"start: the allocation breaks the budgets or structure: {'; '.join(broken)}")
    return start


class _Evolution:
    """One refinement run: state, cached measurements, mutation, selection."""

    def __init__(self, problem: Problem, budgets: Budgets, solver: RefineSolver, start: Allocation) -> None:
        self.problem, self.solver = problem, solver
        self.rng = np.random.default_rng(solver.seed)
        groups = problem.groups
        self.caps = problem.integer_caps(budgets)
        self.tables = {m: groups.sum(problem.integer(m)) for m in self.caps}
        sizes = groups.sum(problem.bytes)
        # Levels: each group's formats from smallest to largest.
        errors = groups.sum(problem.error)
        self.levels = [f[np.lexsort((errors[g, f], sizes[g, f]))] for g, f in enumerate(map(groups.options, range(groups.count)))]
        self.rank_of = np.zeros(groups.allowed.shape, dtype=np.int64)
        for g, formats in enumerate(self.levels):
            self.rank_of[g, formats] = np.arange(len(formats))
        self.movable = np.array([g for g, f in enumerate(self.levels) if len(f) > 1], dtype=np.int64)
        self.start = groups.collapse(np.array(start.choice))
        self.cache: dict[tuple[tuple[int, ...], int], float] = {}

    def measure(self, choice: np.ndarray, samples: int) -> float:
        key = (tuple(choice.tolist()), samples)
        if key not in self.cache:
            self.cache[key] = mean(self.solver.measure, self.allocation(choice), samples)
        return self.cache[key]

    def allocation(self, choice: np.ndarray) -> Allocation:
        return Allocation.of(self.problem, self.problem.groups.expand(choice, self.problem.n_units), solver="refine")

    def totals(self, choice: np.ndarray) -> dict[Metric, int]:
        rows = np.arange(len(choice))
        return {m: int(table[rows, choice].sum()) for m, table in self.tables.items()}

    def mutate(self, parent: np.ndarray) -> np.ndarray | None:
        """1 to ``max_swaps`` swaps (one group a level up, another a level
        down), each keeping the budgets; None if none was found."""
        if len(self.movable) < 2:
            return None
        child = parent.copy()
        totals = self.totals(child)
        swaps = int(self.rng.integers(1, self.solver.max_swaps + 1))
        done = 0
        for _ in range(20 * swaps):
            up, down = self.rng.choice(self.movable, size=2, replace=False)
            up_rank, down_rank = self.rank_of[up, child[up]] + 1, self.rank_of[down, child[down]] - 1
            if up_rank >= len(self.levels[up]) or down_rank < 0:
                continue
            moved = {up: self.levels[up][up_rank], down: self.levels[down][down_rank]}
            after = {m: totals[m] + sum(int(t[g, f] - t[g, child[g]]) for g, f in moved.items()) for m, t in self.tables.items()}
            if all(after[m] <= cap for m, cap in self.caps.items()):
                for g, f in moved.items():
                    child[g] = f
                totals, done = after, done + 1
                if done == swaps:
                    break
        return child if done else None

    def run(self) -> Allocation:
        final_samples = self.solver.schedule[-1][0]
        parent = self.start
        for _ in range(self.solver.generations):
            children = {tuple(c.tolist()): c for c in (self.mutate(parent) for _ in range(self.solver.offspring)) if c is not None}
            children.pop(tuple(parent.tolist()), None)
            candidates = list(children.values())
            for samples, keep in self.solver.schedule[:-1]:
                candidates = sorted(candidates, key=lambda c: self.measure(c, samples))[:keep]
            best = min([parent, *candidates], key=lambda c: self.measure(c, final_samples))
            if self.measure(best, final_samples) < self.measure(parent, final_samples):
                parent = best
        info = {"start_measured": self.measure(self.start, final_samples), "samples": final_samples, "evaluations": len(self.cache)}
        return replace(self.allocation(parent), info=info).with_measured(self.measure(parent, final_samples))


def staged_schedule(smallest: int, final: int) -> tuple[tuple[int, int], ...]:
    """A valid ``schedule`` from a cheapest screening size to the final one: screen at
    ``smallest`` keeping 4, measure a quarter of ``final`` keeping 2 where that lies
    strictly between, decide at ``final``. Sizes that coincide collapse to one stage."""
    stages = [(smallest, 4), (final // 4, 2), (final, 1)]
    kept: list[tuple[int, int]] = []
    for samples, keep in stages:
        if (samples >= final and keep != 1) or samples < min(smallest, final):
            continue
        if kept and samples <= kept[-1][0]:
            continue
        kept.append((samples, keep))
    return tuple(kept)


def refine_front(problem: Problem, front: Front, measure: Measure, **options: object) -> Front:
    """Refine every point of a front within its own size (and latency), then
    keep the points that are not dominated by measurement.

    With ``generations=0`` this only measures each point at the final
    sample count, which re-ranks the front by the real objective.
    """
    refined = []
    for point in front:
        budgets = Budgets(max_bytes=point.bytes, max_latency=point.latency if "latency" in front.axes else None)
        refined.append(RefineSolver(measure, start=point, **options).solve(problem, budgets))  # type: ignore[arg-type]
    return Front.of(refined, ("measured", *(a for a in front.axes if a not in ("error", "measured"))))

"""Allocations near the budget, for the surrogate to measure and learn from.

A model of measured KL is only as good as the allocations it has seen. They should lie where
the answer will: near the budget, around the points worth starting from. So the sample mixes

- level swaps of the start and of each seed (one group a level up, another one down, within
  the budgets), the neighbourhood the search moves in;
- every uniform allocation that fits, and two-width mixes (one format, a random set of groups
  raised to a wider one while the budgets allow), which show how errors add up across the model;
- points of the profile's exact front just below the budget.

Everything is a per-group choice (``Problem.groups``): tie groups move together.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from bitalloc.search.budgets import Budgets
from bitalloc.search.problem import Problem
from bitalloc.search.registry import get_solver
from bitalloc.search.solvers.knapsack import exact_solver_name

FRONT_STEPS = (0.99, 0.97, 0.94)  # fractions of the byte cap at which front points are taken
NEAR = 0.85  # uniform allocations and two-width mixes count as near the budget from this fraction of its bytes


class Sampler:
    """Draws valid per-group choices of a problem within budgets; ``seed`` fixes the draws."""

    def __init__(self, problem: Problem, budgets: Budgets, seed: int = 0) -> None:
        self.problem, self.budgets = problem, budgets
        self.rng = np.random.default_rng(seed)
        groups = problem.groups
        self.caps = problem.integer_caps(budgets)
        self.tables = {m: groups.sum(problem.integer(m)) for m in self.caps}
        sizes, errors = groups.sum(problem.bytes), groups.sum(problem.error)
        self.levels = [f[np.lexsort((errors[g, f], sizes[g, f]))] for g, f in enumerate(map(groups.options, range(groups.count)))]
        self.rank = np.zeros(groups.allowed.shape, dtype=np.int64)
        for g, formats in enumerate(self.levels):
            self.rank[g, formats] = np.arange(len(formats))
        self.movable = np.array([g for g, f in enumerate(self.levels) if len(f) > 1], dtype=np.int64)

    def fits(self, choice: np.ndarray) -> bool:
        rows = np.arange(len(choice))
        return all(int(self.tables[m][rows, choice].sum()) <= cap for m, cap in self.caps.items())

    def near(self, choice: np.ndarray) -> bool:
        """Within the budgets and no more than ``NEAR`` below the byte cap: far smaller allocations
        measure far worse and would teach the model a region the answer never visits."""
        if not self.fits(choice):
            return False
        return "bytes" not in self.caps or self.tables["bytes"][np.arange(len(choice)), choice].sum() >= NEAR * self.caps["bytes"]

    def swaps(self, choice: np.ndarray, count: int) -> np.ndarray | None:
        """``count`` level swaps of ``choice`` that keep the budgets; None if none was found."""
        if len(self.movable) < 2:
            return None
        child, done = choice.copy(), 0
        for _ in range(20 * count):
            up, down = self.rng.choice(self.movable, size=2, replace=False)
            up_rank, down_rank = self.rank[up, child[up]] + 1, self.rank[down, child[down]] - 1
            if up_rank >= len(self.levels[up]) or down_rank < 0:
                continue
            trial = child.copy()
            trial[up], trial[down] = self.levels[up][up_rank], self.levels[down][down_rank]
            if self.fits(trial):
                child, done = trial, done + 1
                if done == count:
                    break
        return child if done else None

    def uniform(self) -> list[np.ndarray]:
        """Every single format all groups allow, where it is near the budget."""
        allowed = self.problem.groups.allowed
        choices = [np.full(len(allowed), f) for f in np.flatnonzero(allowed.all(axis=0))]
        return [c for c in choices if self.near(c)]

    def two_width(self) -> np.ndarray | None:
        """One format everywhere, then a random order of groups raised to one of the next two wider
        formats while the budgets allow; None if that is not near the budget."""
        shared = np.flatnonzero(self.problem.groups.allowed.all(axis=0))
        shared = shared[np.argsort(self.problem.bytes[:, shared].sum(axis=0), kind="stable")]
        if len(shared) < 2:
            return None
        at = int(self.rng.integers(len(shared) - 1))
        low, high = shared[at], shared[min(at + int(self.rng.integers(1, 3)), len(shared) - 1)]
        choice = np.full(self.problem.groups.count, low)
        if not self.fits(choice):
            return None
        for g in self.rng.permutation(len(choice)):
            choice[g] = high
            if not self.fits(choice):
                choice[g] = low
        return choice if self.near(choice) else None

    def front(self) -> list[np.ndarray]:
        """The profile's exact optimum at a few byte caps just below the budget."""
        cap = self.caps["bytes"] if "bytes" in self.caps else int(self.problem.bytes.max(axis=1).sum())
        points = []
        for fraction in FRONT_STEPS:
            budgets = Budgets(max_bytes=int(cap * fraction), max_latency=self.budgets.max_latency,
                              max_error=self.budgets.max_error)
            try:
                point = get_solver(exact_solver_name(self.problem, budgets, "error")).solve(self.problem, budgets)
            except ValueError:  # nothing fits so far below the budget
                continue
            points.append(self.problem.groups.collapse(np.array(point.choice)))
        return points

    def sample(self, centres: Sequence[np.ndarray], count: int) -> list[np.ndarray]:
        """About ``count`` distinct choices: the centres, the uniform ones and the front's, then
        swaps of the centres (1 to 4 swaps each, in turn) and two-width mixes, two to one."""
        chosen: dict[tuple[int, ...], np.ndarray] = {}

        def add(choices: Iterable[np.ndarray | None]) -> None:
            for c in choices:
                if c is not None and len(chosen) < count:
                    chosen.setdefault(tuple(c.tolist()), c)

        add(centres)
        add(self.uniform())
        add(self.front())
        for attempt in range(4 * count):
            if len(chosen) >= count:
                break
            if attempt % 3 == 2:
                add([self.two_width()])
            else:
                add([self.swaps(centres[attempt % len(centres)], 1 + attempt % 4)])
        return list(chosen.values())

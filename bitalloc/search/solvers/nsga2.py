"""nsga2: pymoo's NSGA-II over two or three objectives (error, bytes, latency)."""

from __future__ import annotations

import numpy as np
from pymoo.algorithms.moo.nsga2 import NSGA2
from pymoo.core.problem import Problem as PymooProblem
from pymoo.operators.crossover.sbx import SBX
from pymoo.operators.mutation.pm import PM
from pymoo.operators.repair.rounding import RoundingRepair
from pymoo.optimize import minimize

from bitalloc.search.allocation import Allocation
from bitalloc.search.budgets import Budgets, Metric
from bitalloc.search.errors import SearchError
from bitalloc.search.front import Front
from bitalloc.search.problem import Problem
from bitalloc.search.registry import register
from bitalloc.search.solver import Solver
from bitalloc.search.solvers.hull import HullPath
from bitalloc.search.solvers.knapsack import Knapsack


class AllocationProblem(PymooProblem):
    """The allocation problem as pymoo sees it: one integer variable per
    group with a real choice (its rank among the group's formats sorted by
    bytes, so neighbouring values are neighbouring sizes and SBX/PM moves
    make sense), objectives and budgets as integer totals."""

    def __init__(self, problem: Problem, axes: tuple[Metric, ...], caps: dict[Metric, int]) -> None:
        groups = problem.groups
        metrics = list(dict.fromkeys([*axes, *caps, "bytes", "error"]))
        self.tables = {m: groups.sum(problem.integer(m)).astype(np.float64) for m in metrics}
        self.options = [f[np.lexsort((self.tables["error"][g, f], self.tables["bytes"][g, f]))] for g, f in enumerate(map(groups.options, range(groups.count)))]
        self.free = np.array([g for g, f in enumerate(self.options) if len(f) > 1], dtype=np.int64)
        width = max(len(f) for f in self.options)
        self.lookup = np.array([np.pad(f, (0, width - len(f)), mode="edge") for f in self.options])  # [G, width] rank -> format
        self.axes, self.caps = axes, caps
        super().__init__(n_var=len(self.free), n_obj=len(axes), n_ieq_constr=len(caps), xl=0, xu=np.array([len(self.options[g]) - 1 for g in self.free]), vtype=int)

    def group_choice(self, x: np.ndarray) -> np.ndarray:
        """Formats per group for rows of variables [n, n_var] -> [n, G]."""
        ranks = np.zeros((len(x), len(self.options)), dtype=np.int64)
        ranks[:, self.free] = np.rint(x).astype(np.int64)
        return self.lookup[np.arange(len(self.options)), ranks]

    def variables(self, group_choice: np.ndarray) -> np.ndarray:
        """The inverse of :meth:`group_choice` for one allocation."""
        return np.array([int(np.flatnonzero(self.options[g] == group_choice[g])[0]) for g in self.free])

    def _evaluate(self, x: np.ndarray, out: dict, *args: object, **kwargs: object) -> None:
        choice = self.group_choice(x)
        rows = np.arange(choice.shape[1])
        totals = {m: t[rows, choice].sum(axis=1) for m, t in self.tables.items()}
        out["F"] = np.column_stack([totals[m] for m in self.axes])
        if self.caps:
            out["G"] = np.column_stack([(totals[m] - cap) / max(cap, 1) for m, cap in self.caps.items()])


@register
class NSGA2Solver(Solver):
    """Evolutionary multi-objective search (pymoo NSGA-II).

    Minimises two or three of error, bytes and latency at once, with budgets
    as constraints, and returns what it found non-dominated. Half the first
    population is the convex-hull greedy at budgets up to the cap, so the
    search starts on a good front and spends its generations improving it. A heuristic: its front is never better than the exact one
    (the tests check that), and :meth:`solve` raises ``SearchError`` if it
    finds nothing within the budgets. Use it for three objectives or as a
    cross-check; for two, ``dp`` is exact and faster.
    """

    name = "nsga2"

    def __init__(self, pop_size: int = 100, generations: int = 200, seed: int = 0) -> None:
        self.pop_size = pop_size
        self.generations = generations
        self.seed = seed

    def _solve(self, problem: Problem, budgets: Budgets, objective: Metric) -> Allocation:
        caps = problem.integer_caps(budgets)
        others = [m for m in caps if m != objective] or ["bytes" if objective == "error" else "error"]
        axes = (objective, *others)
        found = self._search(problem, axes, caps)
        return min(found, key=lambda a: tuple(a.value(m) for m in axes))

    def _front(self, problem: Problem, axes: tuple[Metric, ...], points: int, budgets: Budgets) -> Front:
        return Front.of(self._search(problem, axes, problem.integer_caps(budgets)), axes)

    def _search(self, problem: Problem, axes: tuple[Metric, ...], caps: dict[Metric, int]) -> list[Allocation]:
        model = AllocationProblem(problem, axes, caps)
        if model.n_var == 0:  # every group has one format: nothing to search
            return [Allocation.of(problem, problem.groups.expand(model.group_choice(np.zeros((1, 0)))[0], problem.n_units), solver=self.name)]
        algorithm = NSGA2(
            pop_size=self.pop_size,
            sampling=self._first_population(problem, model, axes, caps),
            crossover=SBX(prob=0.9, eta=15, vtype=float, repair=RoundingRepair()),
            mutation=PM(eta=20, vtype=float, repair=RoundingRepair()),
            eliminate_duplicates=False,
        )
        result = minimize(model, algorithm, ("n_gen", self.generations), seed=self.seed, verbose=False)
        if result.X is None:
            raise SearchError(f"solver 'nsga2' found no allocation within the budgets in {self.generations} generations; solver='ilp' decides whether one exists")
        choices = model.group_choice(np.atleast_2d(result.X))
        return [Allocation.of(problem, problem.groups.expand(c, problem.n_units), solver=self.name) for c in choices]

    def _first_population(self, problem: Problem, model: AllocationProblem, axes: tuple[Metric, ...], caps: dict[Metric, int]) -> np.ndarray:
        """Half: greedy allocations at budgets spread evenly over the second
        axis up to its cap (so greedy's answer is among them); half: random."""
        form = Knapsack.between(axes[0], axes[1])
        resource, value = form.tables(problem)
        path = HullPath.build(resource, value, problem.groups.allowed)
        end = path.start_resource + int(path.d_resource.sum())
        limits = np.linspace(path.start_resource, min(end, caps.get(form.resource, end)), self.pop_size // 2)
        seeded = [model.variables(path.within(int(b))) for b in limits]
        random = np.random.default_rng(self.seed).integers(0, model.xu + 1, size=(self.pop_size - len(seeded), model.n_var))
        return np.vstack([np.array(seeded).reshape(len(seeded), model.n_var), random]).astype(float)

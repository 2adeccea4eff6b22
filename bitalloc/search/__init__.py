"""bitalloc search: choose a number format per unit within budgets.

Pure numpy + OR-Tools + pymoo + Optuna; knows nothing of models. Build a
:class:`Problem` from a profile's arrays, then ``solve`` for one
:class:`Allocation`, ``front`` for the trade-off curve, or
``smallest_within`` for an accuracy target. Solvers by name: ``dp``
(default, exact), ``ilp`` (exact, any budgets), ``greedy``, ``nsga2``,
``optuna`` and ``refine`` (by a measured objective).
"""

from bitalloc.lazy import lazy_exports
from bitalloc.search.allocation import Allocation
from bitalloc.search.budgets import Budgets, Metric
from bitalloc.search.errors import InfeasibleBudget, SearchError
from bitalloc.search.front import Front
from bitalloc.search.measure import Measure
from bitalloc.search.pareto import hypervolume, non_dominated
from bitalloc.search.problem import Problem
from bitalloc.search.registry import SOLVERS, available, front, get_solver, register, solve
from bitalloc.search.solver import Solver

# Imported on first use, with the solvers and SciPy behind them (see ``registry.available``).
_LAZY = {"refine_front": "bitalloc.search.solvers.refine", "smallest_within": "bitalloc.search.target"}

__all__ = [
    "Allocation", "Budgets", "Front", "InfeasibleBudget", "Metric", "Problem",
    "Measure", "SOLVERS", "SearchError", "Solver", "available", "front", "get_solver", "hypervolume",
    "non_dominated", "refine_front", "register", "smallest_within", "solve",
]

__getattr__ = lazy_exports(__name__, globals(), _LAZY)

"""bitalloc search: choose a number format per unit within budgets.

Pure numpy + OR-Tools + pymoo + Optuna; knows nothing of models. Build a
:class:`Problem` from a profile's arrays, then ``solve`` for one
:class:`Allocation`, ``front`` for the trade-off curve, or
``smallest_within`` for an accuracy target. Solvers by name: ``dp``
(default, exact), ``ilp`` (exact, any budgets), ``greedy``, ``nsga2``,
``optuna`` and ``refine`` (by a measured objective).
"""

from search.allocation import Allocation
from search.budgets import Budgets, Metric
from search.errors import InfeasibleBudget, SearchError
from search.evaluators import Evaluator, SampledEvaluator, WindowedEvaluator
from search.front import Front
from search.pareto import hypervolume, non_dominated
from search.problem import Problem
from search.registry import SOLVERS, front, get_solver, register, solve
from search.solver import Solver
from search.solvers.refine import refine_front
from search.target import smallest_within

__all__ = [
    "Allocation", "Budgets", "Evaluator", "Front", "InfeasibleBudget", "Metric", "Problem",
    "SOLVERS", "SampledEvaluator", "SearchError", "Solver", "front", "get_solver", "hypervolume",
    "WindowedEvaluator", "non_dominated", "refine_front", "register", "smallest_within", "solve",
]

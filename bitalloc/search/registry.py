"""Solvers by name: ``solve(problem, budgets, solver="dp")``.

A registry rather than imports at call sites so the CLI, the service and
configs can name a solver as a string, and a new solver is one decorated
class.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from importlib import import_module
from typing import Any, TypeVar

from bitalloc.search.allocation import Allocation
from bitalloc.search.budgets import Budgets, Metric
from bitalloc.search.front import Front
from bitalloc.search.problem import Problem
from bitalloc.search.solver import Solver

SOLVERS: dict[str, type[Solver]] = {}

S = TypeVar("S", bound=type[Solver])


def register(cls: S) -> S:
    """Class decorator: make a solver available under ``cls.name``."""
    SOLVERS[cls.name] = cls
    return cls


def available() -> dict[str, type[Solver]]:
    """Every registered solver by name. The built-in ones are imported on first use: OR-Tools,
    pymoo, Optuna and SciPy take a second to import, which a command that solves nothing (or
    refuses a bad argument) should not pay."""
    import_module("bitalloc.search.solvers")
    return SOLVERS


def get_solver(name: str, **options: Any) -> Solver:
    """A configured solver; ``options`` are its constructor's arguments."""
    if name not in available():
        raise ValueError(f"solver: unknown solver {name!r}; available: {', '.join(sorted(SOLVERS))}")
    signature = inspect.signature(SOLVERS[name])
    try:
        signature.bind(**options)
    except TypeError as exc:
        raise ValueError(f"solver {name!r}: {exc}; its options are {', '.join(signature.parameters) or 'none'}") from None
    return SOLVERS[name](**options)


def solve(problem: Problem, budgets: Budgets | None = None, solver: str = "dp", objective: Metric = "error", **options: Any) -> Allocation:
    """The allocation minimising ``objective`` (default: total error) within ``budgets``."""
    return get_solver(solver, **options).solve(problem, budgets, objective)


def front(
    problem: Problem,
    axes: Sequence[Metric] = ("error", "bytes"),
    points: int = 64,
    budgets: Budgets | None = None,
    solver: str = "dp",
    **options: Any,
) -> Front:
    """The trade-off front along ``axes`` (default error vs bytes)."""
    return get_solver(solver, **options).front(problem, axes, points, budgets)

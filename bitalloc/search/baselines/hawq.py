"""HAWQ-V3 (Yao et al. 2021): Hessian-aware sensitivity summed and minimised by an ILP.

The paper's objective is ``Omega = sum_i Tr(H_i)/n_i * ||Q(W_i) - W_i||^2`` (the average
Hessian trace of layer i times the squared norm of its quantization perturbation),
minimised by an integer linear program subject to model size, BOPS or latency limits,
with equality constraints where layers must share a precision (the public ``ILP.ipynb``
of Zhen-Dong/HAWQ builds exactly this with PuLP). bitalloc's ``hessian_trace`` metric
(``quant/metrics/hessian_trace.py``) fills each cell with that very term, from
Hutchinson's estimator of ``Tr(H_i)`` on the next-token loss, as the paper does with
PyHessian. So HAWQ-V3 here is: a Problem built from a ``hessian_trace`` profile, solved
by the exact ``ilp`` solver (OR-Tools CP-SAT) at the budget, ties honoured. The formats
it picks are then scored on any other profile of the same units and formats with
:func:`rescore` (e.g. to compare its predicted output error, or to measure its KL).
"""

from __future__ import annotations

from typing import Any

from bitalloc.search.allocation import Allocation
from bitalloc.search.budgets import Budgets
from bitalloc.search.problem import Problem
from bitalloc.search.registry import solve


def hawq_v3(trace_problem: Problem, budgets: Budgets, **options: Any) -> Allocation:
    """The HAWQ-V3 allocation: ILP over the Hessian-trace sensitivities within ``budgets``.

    ``trace_problem`` must be built from a ``hessian_trace`` profile; ``options`` go to
    the ``ilp`` solver (``time_limit``, ``workers``, ``seed``).
    """
    allocation = solve(trace_problem, budgets, solver="ilp", **options)
    info = {"baseline": "hawq_v3", "budgets": budgets.describe(), "objective": "sum Tr(H)/n * ||Q(W)-W||^2",
            "solver": "ilp", **dict(allocation.info)}
    return Allocation.of(trace_problem, allocation.choice, solver="hawq_v3", info=info)


def rescore(allocation: Allocation, problem: Problem) -> Allocation:
    """The same formats, unit by unit, with totals from ``problem`` (same units and formats by name).

    Provenance (``solver``, ``info``) and a measured value are kept; bytes and average bits
    are unchanged when both problems cost formats alike, the error is ``problem``'s.
    """
    return Allocation.from_dict(allocation.to_dict(), problem)

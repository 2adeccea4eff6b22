"""The two ways a search can fail to answer, kept apart so callers can tell
"your budget cannot be met" (the user's to fix) from "this solver gave up"
(try another solver or a longer limit)."""

from __future__ import annotations

_UNITS = {"max_bytes": " bytes", "max_avg_bits": " bits"}
_WHAT = {"max_bytes": "size", "max_avg_bits": "average", "max_latency": "latency", "max_error": "error"}


class InfeasibleBudget(ValueError):
    """No allocation meets a budget; says the smallest value that can be met.

    A ``ValueError`` because the budget is bad input, carrying the numbers a
    caller needs to suggest a better one: ``budget`` (the field name),
    ``limit`` (what was asked) and ``smallest`` (the least achievable value,
    alone or, when ``others`` names budgets, together with those).
    """

    def __init__(self, budget: str, limit: float, smallest: float, others: str = "") -> None:
        self.budget = budget
        self.limit = limit
        self.smallest = smallest
        together = f" together with {others}" if others else ""
        super().__init__(
            f"{budget}={_number(limit)} is infeasible{together}: the smallest achievable "
            f"{_WHAT[budget]} is {_number(smallest)}{_UNITS.get(budget, '')}"
        )


class SearchError(RuntimeError):
    """A solver stopped without an answer it can stand behind: a time limit hit
    before any allocation was found, or a heuristic that found nothing within
    the budgets (which does not prove the budgets infeasible)."""


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.6g}"

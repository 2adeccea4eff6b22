"""Allocation: one format per unit, with the totals a user decides by."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from bitalloc.search.problem import Problem


@dataclass(frozen=True)
class Allocation:
    """A format index per unit (``choice``) and its predicted totals.

    Totals are computed from the problem when the allocation is made
    (:meth:`of`), never taken from a solver, so they are the truth for these
    choices. ``solver`` and ``info`` record how it was found (for exact
    solvers, what the answer is guaranteed to be); ``measured`` is a real
    quality (e.g. KL) once an evaluator has measured it.
    """

    choice: tuple[int, ...]
    unit_names: tuple[str, ...]
    format_names: tuple[str, ...]
    bytes: int
    avg_bits: float
    error: float
    latency: float | None
    solver: str = ""
    info: Mapping[str, Any] = field(default_factory=dict)
    measured: float | None = None

    @classmethod
    def of(cls, problem: Problem, choice: Sequence[int], solver: str = "", info: Mapping[str, Any] | None = None) -> Allocation:
        choice = np.asarray(choice, dtype=np.int64)
        return cls(
            choice=tuple(int(f) for f in choice),
            unit_names=tuple(problem.unit_names),
            format_names=tuple(problem.format_names),
            solver=solver,
            info=dict(info or {}),
            **problem.totals(choice),
        )

    def value(self, metric: str) -> float:
        """A total by metric name: ``error``, ``bytes``, ``latency`` or ``measured``."""
        value = getattr(self, metric)
        if value is None:
            raise ValueError(f"{metric}: this allocation has no {metric}")
        return value

    def with_measured(self, measured: float) -> Allocation:
        return replace(self, measured=float(measured))

    @property
    def formats(self) -> dict[str, str]:
        """Unit name -> format name, the form runtimes and users read."""
        return {u: self.format_names[f] for u, f in zip(self.unit_names, self.choice)}

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: formats by name, totals, provenance."""
        return {
            "formats": self.formats,
            "bytes": self.bytes,
            "avg_bits": self.avg_bits,
            "error": self.error,
            "latency": self.latency,
            "measured": self.measured,
            "solver": self.solver,
            "info": dict(self.info),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], problem: Problem) -> Allocation:
        """Rebuild against ``problem``; totals are recomputed from it.

        Raises ValueError when the units or formats named are not the
        problem's (the allocation belongs to another profile).
        """
        formats = data["formats"]
        if set(formats) != set(problem.unit_names):
            missing = sorted(set(problem.unit_names) - set(formats))
            extra = sorted(set(formats) - set(problem.unit_names))
            raise ValueError(f"formats: units do not match the problem (missing {missing[:3]}, unknown {extra[:3]})")
        index = {name: i for i, name in enumerate(problem.format_names)}
        unknown = sorted({f for f in formats.values() if f not in index})
        if unknown:
            raise ValueError(f"formats: unknown format names {unknown[:3]}")
        choice = [index[formats[u]] for u in problem.unit_names]
        allocation = cls.of(problem, choice, solver=data.get("solver", ""), info=data.get("info"))
        measured = data.get("measured")
        return allocation if measured is None else allocation.with_measured(measured)

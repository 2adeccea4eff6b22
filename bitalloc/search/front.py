"""Front: the non-dominated allocations of a problem along some axes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from bitalloc.search.allocation import Allocation
from bitalloc.search.budgets import METRICS, Metric
from bitalloc.search.pareto import hypervolume, non_dominated

if TYPE_CHECKING:
    from bitalloc.search.problem import Problem


@dataclass(frozen=True)
class Front:
    """Allocations no other allocation here beats on every axis.

    ``axes`` are allocation totals (``error``, ``bytes``, ``latency``, or
    ``measured`` once an evaluator has measured every point), all minimised;
    the first is the objective a point was optimised for. Points are sorted
    by the second axis (e.g. size, smallest first).
    """

    axes: tuple[str, ...]
    allocations: tuple[Allocation, ...]

    @classmethod
    def of(cls, allocations: Iterable[Allocation], axes: Sequence[str]) -> Front:
        """Keep the non-dominated allocations (each distinct point once)."""
        axes = check_axes(axes, measured=True)
        allocations = list(allocations)
        points = np.array([[a.value(m) for m in axes] for a in allocations], dtype=np.float64).reshape(len(allocations), len(axes))
        kept = non_dominated(points)
        kept = kept[np.lexsort((points[kept, 0], points[kept, 1]))]
        return cls(axes=axes, allocations=tuple(allocations[i] for i in kept))

    def __len__(self) -> int:
        return len(self.allocations)

    def __iter__(self) -> Iterator[Allocation]:
        return iter(self.allocations)

    def __getitem__(self, index: int) -> Allocation:
        return self.allocations[index]

    def points(self) -> np.ndarray:
        """[n, len(axes)] objective values, one row per allocation."""
        return np.array([[a.value(m) for m in self.axes] for a in self.allocations], dtype=np.float64).reshape(len(self), len(self.axes))

    def hypervolume(self, reference: Sequence[float]) -> float:
        return hypervolume(self.points(), np.asarray(reference))

    def to_dict(self) -> dict[str, Any]:
        return {"axes": list(self.axes), "allocations": [a.to_dict() for a in self.allocations]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], problem: Problem) -> Front:
        return cls.of((Allocation.from_dict(a, problem) for a in data["allocations"]), data["axes"])


def check_axes(axes: Sequence[str], measured: bool = False) -> tuple[Metric, ...]:
    """Validate front axes: 2 or 3 distinct metric names (or ``measured``,
    for fronts of measured allocations)."""
    axes = tuple(axes)
    names = (*METRICS, "measured") if measured else METRICS
    if len(axes) not in (2, 3) or len(set(axes)) != len(axes) or not set(axes) <= set(names):
        raise ValueError(f"axes must be 2 or 3 distinct names from {names}, got {axes}")
    return axes  # type: ignore[return-value]

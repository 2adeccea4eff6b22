"""Problem: a profile's plain arrays plus the structure solvers must respect."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from bitalloc.search.budgets import Budgets, Metric, average_bits
from bitalloc.search.groups import Groups, build_groups
from bitalloc.search.scaling import IntegerScale


@dataclass(frozen=True, eq=False)
class Problem:
    """What to allocate: U units, each taking one of F formats.

    ``error[u, f]``, ``bytes[u, f]`` (exact, integer) and optional
    ``latency[u, f]`` are additive costs of unit u in format f;
    ``allowed[u, f]`` masks formats a unit cannot take (values there are
    ignored and may be NaN); ``numel[u]`` counts elements, for average bits;
    ``tie_groups`` lists unit indices that must share a format; ``fixed``
    pins units to a format index. Inputs are validated and copied read-only,
    so a Problem can be shared between solvers and threads.
    """

    error: np.ndarray
    bytes: np.ndarray
    numel: np.ndarray
    unit_names: Sequence[str]
    format_names: Sequence[str]
    latency: np.ndarray | None = None
    allowed: np.ndarray | None = None
    tie_groups: Sequence[Sequence[int]] = ()
    fixed: Mapping[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        error = np.asarray(self.error, dtype=np.float64)
        if error.ndim != 2 or 0 in error.shape:
            raise ValueError(f"error must be a non-empty [units, formats] array, got shape {error.shape}")
        shape = error.shape
        n_units, n_formats = shape
        allowed = np.ones(shape, bool) if self.allowed is None else np.asarray(self.allowed)
        _check_shape("allowed", allowed, shape)
        if allowed.dtype != bool:
            raise ValueError(f"allowed must be a bool array, got dtype {allowed.dtype}")
        if not allowed.any(axis=1).all():
            raise ValueError(f"allowed: unit {np.flatnonzero(~allowed.any(axis=1))[0]} has no allowed format")
        set_(self, "allowed", _frozen(allowed))
        set_(self, "error", _frozen(_finite("error", error, allowed)))
        set_(self, "bytes", _frozen(_whole("bytes", self.bytes, shape, allowed)))
        if self.latency is not None:
            latency = np.asarray(self.latency, dtype=np.float64)
            _check_shape("latency", latency, shape)
            set_(self, "latency", _frozen(_finite("latency", latency, allowed)))
        numel = _whole("numel", self.numel, (n_units,), np.ones(n_units, bool))
        if (numel <= 0).any():
            raise ValueError("numel must be positive for every unit")
        set_(self, "numel", _frozen(numel))
        set_(self, "unit_names", _names("unit_names", self.unit_names, n_units))
        set_(self, "format_names", _names("format_names", self.format_names, n_formats))
        set_(self, "tie_groups", tuple(_indices("tie_groups", tie, n_units) for tie in self.tie_groups))
        fixed = {}
        for unit, fmt in dict(self.fixed).items():
            (unit,) = _indices("fixed", [unit], n_units)
            if not isinstance(fmt, (int, np.integer)) or not 0 <= fmt < n_formats:
                raise ValueError(f"fixed: unit {unit} has unknown format index {fmt!r} ({n_formats} formats)")
            if not allowed[unit, fmt]:
                raise ValueError(f"fixed: unit {unit} is fixed to format {fmt}, which it does not allow")
            fixed[unit] = int(fmt)
        set_(self, "fixed", fixed)
        self.groups  # build now, so conflicting ties and fixed units fail here  # noqa: B018

    @property
    def n_units(self) -> int:
        return self.error.shape[0]

    @property
    def n_formats(self) -> int:
        return self.error.shape[1]

    @cached_property
    def total_numel(self) -> int:
        return int(self.numel.sum())

    @cached_property
    def groups(self) -> Groups:
        return build_groups(self.allowed, self.tie_groups, self.fixed, self.unit_names)

    def values(self, metric: Metric) -> np.ndarray:
        """The per-cell table of a metric; latency must have been given."""
        if metric == "latency" and self.latency is None:
            raise ValueError("latency: this problem has no latency table")
        return {"error": self.error, "bytes": self.bytes, "latency": self.latency}[metric]

    @cached_property
    def _scales(self) -> dict[Metric, IntegerScale]:
        given: list[Metric] = ["error"] if self.latency is None else ["error", "latency"]
        return {m: IntegerScale.for_values(self.values(m), self.allowed) for m in given}

    @cached_property
    def _integers(self) -> dict[Metric, np.ndarray]:
        tables = {m: _frozen(scale.apply(self.values(m), self.allowed)) for m, scale in self._scales.items()}
        return {"bytes": self.bytes, **tables}

    def integer(self, metric: Metric) -> np.ndarray:
        """Per-cell integers of a metric (see :mod:`search.scaling`); bytes as is."""
        self.values(metric)
        return self._integers[metric]

    def integer_cap(self, metric: Metric, limit: float) -> int:
        """The largest integer total that meets ``limit`` on ``metric``."""
        self.values(metric)
        return int(limit) if metric == "bytes" else self._scales[metric].cap(limit)

    def tolerance(self, metric: Metric) -> float:
        """How far a float budget can be exceeded by rounding (0 for bytes).

        Solvers admit exactly the allocations whose integer total is within
        :meth:`integer_cap`; that never excludes one that meets the budget
        exactly, and admits none that exceeds it by more than this (at most
        1e-9 of the metric's magnitude).
        """
        self.values(metric)
        return 0.0 if metric == "bytes" else self._scales[metric].tolerance

    def real(self, metric: Metric, integer: int) -> float:
        """An amount in a metric's integer scale, in the metric's own units."""
        self.values(metric)
        return integer if metric == "bytes" else integer / self._scales[metric].factor

    def integer_caps(self, budgets: Budgets) -> dict[Metric, int]:
        """Every limited metric's integer cap (``max_avg_bits`` folded into bytes)."""
        caps = budgets.caps(self.total_numel)
        return {metric: self.integer_cap(metric, limit) for metric, limit in caps.items()}

    def violations(self, choice: Sequence[int], budgets: Budgets) -> list[str]:
        """Why a per-unit choice is not a valid answer; empty when it is."""
        choice = np.asarray(choice)
        if choice.shape != (self.n_units,):
            return [f"choice has shape {choice.shape}, expected ({self.n_units},)"]
        problems = [f"unit {self.unit_names[u]} takes a format it does not allow" for u in np.flatnonzero(~self.allowed[np.arange(self.n_units), choice])]
        problems += [f"tied units {list(t)} take different formats" for t in self.tie_groups if len(set(choice[list(t)])) > 1]
        problems += [f"fixed unit {self.unit_names[u]} is not in format {f}" for u, f in self.fixed.items() if choice[u] != f]
        for metric, cap in self.integer_caps(budgets).items():
            if self.integer_total(choice, metric) > cap:
                problems.append(f"{metric} total exceeds its budget")
        return problems

    def integer_total(self, choice: Sequence[int], metric: Metric) -> int:
        """The exact integer total of a metric for a per-unit choice."""
        return int(self.integer(metric)[np.arange(self.n_units), np.asarray(choice)].sum())

    def totals(self, choice: np.ndarray) -> dict[str, float | int | None]:
        """bytes, avg_bits, error and latency of a per-unit choice."""
        rows = np.arange(self.n_units)
        total_bytes = int(self.bytes[rows, choice].sum())
        latency = None if self.latency is None else math.fsum(self.latency[rows, choice])
        return {
            "bytes": total_bytes,
            "avg_bits": average_bits(total_bytes, self.total_numel),
            "error": math.fsum(self.error[rows, choice]),
            "latency": latency,
        }


def _frozen(array: np.ndarray) -> np.ndarray:
    array = np.array(array, copy=True)
    array.flags.writeable = False
    return array


def _check_shape(name: str, array: np.ndarray, shape: tuple[int, ...]) -> None:
    if array.shape != shape:
        raise ValueError(f"{name} has shape {array.shape}, expected {shape}")


def _finite(name: str, values: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    bad = allowed & ~np.isfinite(values)
    if bad.any():
        u, f = np.argwhere(bad)[0]
        raise ValueError(f"{name} is not finite (NaN or inf) at unit {u}, format {f}, which is allowed")
    return np.where(allowed, values, 0.0)


def _whole(name: str, values: object, shape: tuple[int, ...], allowed: np.ndarray) -> np.ndarray:
    array = np.asarray(values)
    _check_shape(name, array, shape)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numeric, got dtype {array.dtype}")
    kept = np.where(allowed, array, 0)
    if array.dtype.kind == "f" and (not np.isfinite(kept).all() or (kept != np.round(kept)).any()):
        raise ValueError(f"{name} must hold whole, finite numbers")
    if (kept < 0).any():
        raise ValueError(f"{name} must not be negative")
    return kept.astype(np.int64)


def _names(name: str, names: Sequence[str], count: int) -> tuple[str, ...]:
    names = tuple(str(n) for n in names)
    if len(names) != count:
        raise ValueError(f"{name} has {len(names)} entries, expected {count}")
    if len(set(names)) != count:
        raise ValueError(f"{name} must be unique")
    return names


def _indices(name: str, indices: Sequence[int], n_units: int) -> tuple[int, ...]:
    out = []
    for i in indices:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n_units:
            raise ValueError(f"{name}: unknown unit index {i!r} (the problem has {n_units} units)")
        out.append(int(i))
    return tuple(out)

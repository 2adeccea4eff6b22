"""Helpers every baseline shares: formats by name, their bits per weight, fixed units."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bitalloc.search.budgets import Budgets
from bitalloc.search.problem import Problem


def format_index(problem: Problem, fmt: str | int, field: str = "format") -> int:
    """A format's index, by name or index; a clear error for one the problem lacks."""
    if isinstance(fmt, (int, np.integer)) and not isinstance(fmt, bool):
        if not 0 <= fmt < problem.n_formats:
            raise ValueError(f"{field}: format index {fmt} out of range ({problem.n_formats} formats)")
        return int(fmt)
    if fmt not in problem.format_names:
        raise ValueError(f"{field}: unknown format {fmt!r}; the problem has {', '.join(problem.format_names)}")
    return list(problem.format_names).index(fmt)


def format_bits(problem: Problem) -> np.ndarray:
    """Bits per weight of each format as the problem's bytes count them.

    ``8 * sum(bytes) / sum(numel)`` over the units that allow the format: scales, offsets
    and partial groups included, so a format is placed where it really sits on the
    average-bits axis. NaN for a format no unit allows.
    """
    allowed = problem.allowed
    numel = np.where(allowed, problem.numel[:, None], 0).sum(axis=0)
    total = np.where(allowed, problem.bytes, 0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(numel > 0, 8.0 * total / np.maximum(numel, 1), np.nan)


def nearest_format(bits: float, candidates: Sequence[int], format_bpw: np.ndarray) -> int:
    """The candidate whose bits per weight is nearest ``bits``; a tie goes to the larger."""
    if not candidates:
        raise ValueError("no candidate formats")
    return min(candidates, key=lambda f: (round(abs(format_bpw[f] - bits), 9), -format_bpw[f]))


def pin_fixed(problem: Problem, choice: np.ndarray) -> np.ndarray:
    """The problem's fixed units set to their formats (the user's pins hold for baselines too)."""
    choice = np.array(choice, dtype=np.int64)
    for unit, fmt in problem.fixed.items():
        choice[unit] = fmt
    return choice


def check_allowed(problem: Problem, choice: np.ndarray, what: str) -> None:
    bad = np.flatnonzero(~problem.allowed[np.arange(problem.n_units), choice])
    if bad.size:
        u = bad[0]
        raise ValueError(f"{what}: unit {problem.unit_names[u]} does not allow format "
                         f"{problem.format_names[choice[u]]} ({bad.size} such units)")


def byte_cap(problem: Problem, target_avg_bits: float) -> int:
    """The largest byte total within ``target_avg_bits``, exactly as the solvers count it."""
    cap = Budgets(max_avg_bits=target_avg_bits).byte_cap(problem.total_numel)
    assert cap is not None
    return cap


def total_bytes(problem: Problem, choice: np.ndarray) -> int:
    return int(problem.bytes[np.arange(problem.n_units), choice].sum())


def by_name(values: Mapping[str, float] | Sequence[float] | np.ndarray, problem: Problem, field: str) -> np.ndarray:
    """Per-unit numbers in the problem's unit order, from a mapping by name or a sequence."""
    if isinstance(values, Mapping):
        missing = [u for u in problem.unit_names if u not in values]
        if missing:
            raise ValueError(f"{field}: no value for units {missing[:3]} ({len(missing)} missing)")
        array = np.array([float(values[u]) for u in problem.unit_names])
    else:
        array = np.asarray(values, dtype=np.float64)
        if array.shape != (problem.n_units,):
            raise ValueError(f"{field} has shape {array.shape}, expected ({problem.n_units},)")
    if not np.isfinite(array).all():
        raise ValueError(f"{field} must be finite for every unit")
    return array

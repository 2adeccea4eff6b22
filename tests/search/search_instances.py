"""Random small problems and a brute force that knows nothing of the solvers."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bitalloc.search import Allocation, Budgets, Problem


@st.composite
def problems(draw: st.DrawFn, max_units: int = 5, max_formats: int = 4, structure: bool = True) -> Problem:
    """Small problems; with ``structure``, maybe a tie group and a fixed unit."""
    units = draw(st.integers(1, max_units))
    formats = draw(st.integers(1, max_formats))
    shape = (units, formats)
    error = draw(arrays(np.float64, shape, elements=st.floats(0.0, 100.0, allow_subnormal=False)))
    size = draw(arrays(np.int64, shape, elements=st.integers(0, 500)))
    latency = draw(arrays(np.float64, shape, elements=st.floats(0.0, 10.0, allow_subnormal=False)))
    allowed = draw(arrays(np.bool_, shape, elements=st.booleans()))
    allowed[np.arange(units), draw(arrays(np.int64, units, elements=st.integers(0, formats - 1)))] = True
    ties: list[list[int]] = []
    fixed: dict[int, int] = {}
    if structure and units >= 2 and draw(st.booleans()):
        tie = draw(st.lists(st.integers(0, units - 1), min_size=2, max_size=3, unique=True))
        common = draw(st.integers(0, formats - 1))
        allowed[tie, common] = True  # a tie group must share an allowed format
        ties.append(tie)
    if structure and draw(st.booleans()):
        unit = draw(st.integers(0, units - 1))
        members = next((t for t in ties if unit in t), [unit])
        shared = np.flatnonzero(allowed[members].all(axis=0))
        fixed[unit] = int(draw(st.sampled_from(list(shared))))
    numel = draw(arrays(np.int64, units, elements=st.integers(1, 1000)))
    return Problem(
        error=error, bytes=size, latency=latency, allowed=allowed, numel=numel,
        unit_names=[f"unit{u}" for u in range(units)], format_names=[f"fmt{f}" for f in range(formats)],
        tie_groups=ties, fixed=fixed,
    )


@dataclass
class Enumerated:
    """Every valid allocation of a problem with its totals, by enumeration."""

    choices: np.ndarray
    bytes: np.ndarray
    avg_bits: np.ndarray
    error: np.ndarray
    latency: np.ndarray

    def meets(self, budgets: Budgets, slack: dict[str, float] | None = None) -> np.ndarray:
        """Which allocations meet the budgets exactly (each limit lowered by ``slack``)."""
        slack = slack or {}
        ok = np.ones(len(self.choices), dtype=bool)
        if budgets.max_bytes is not None:
            ok &= self.bytes <= budgets.max_bytes - slack.get("bytes", 0)
        if budgets.max_avg_bits is not None:
            ok &= self.avg_bits <= budgets.max_avg_bits
        if budgets.max_latency is not None:
            ok &= self.latency <= budgets.max_latency - slack.get("latency", 0)
        if budgets.max_error is not None:
            ok &= self.error <= budgets.max_error - slack.get("error", 0)
        return ok

    def total(self, metric: str) -> np.ndarray:
        return getattr(self, metric)


def enumerate_allocations(problem: Problem) -> Enumerated:
    """All per-unit choices that respect allowed formats, ties and fixed units."""
    units, formats = problem.error.shape
    valid = []
    for choice in itertools.product(range(formats), repeat=units):
        c = np.array(choice)
        if not problem.allowed[np.arange(units), c].all():
            continue
        if any(len(set(c[list(t)])) > 1 for t in problem.tie_groups):
            continue
        if any(c[u] != f for u, f in problem.fixed.items()):
            continue
        valid.append(c)
    choices = np.array(valid)
    rows = np.arange(units)
    size = np.array([int(problem.bytes[rows, c].sum()) for c in choices])
    return Enumerated(
        choices=choices,
        bytes=size,
        avg_bits=np.array([8 * int(b) / problem.total_numel for b in size]),
        error=np.array([math.fsum(problem.error[rows, c]) for c in choices]),
        latency=np.array([math.fsum(problem.latency[rows, c]) for c in choices]),
    )


def assert_valid(problem: Problem, allocation: Allocation, budgets: Budgets) -> None:
    """The answer respects allowed formats, ties, fixed units and every budget
    (floats within the problem's stated tolerance)."""
    c = np.array(allocation.choice)
    assert problem.allowed[np.arange(problem.n_units), c].all()
    for tie in problem.tie_groups:
        assert len(set(c[list(tie)])) == 1
    for unit, fmt in problem.fixed.items():
        assert c[unit] == fmt
    if budgets.max_bytes is not None:
        assert allocation.bytes <= budgets.max_bytes
    if budgets.max_avg_bits is not None:
        assert allocation.avg_bits <= budgets.max_avg_bits
    if budgets.max_latency is not None:
        assert allocation.latency <= budgets.max_latency + problem.tolerance("latency")
    if budgets.max_error is not None:
        assert allocation.error <= budgets.max_error + problem.tolerance("error")


def small_model(units: int = 6, seed: int = 7) -> Problem:
    """A fixed, model-like problem: formats int2/4/8/16, error falling 4x per
    bit, sizes from element counts."""
    rng = np.random.default_rng(seed)
    bits = np.array([2, 4, 8, 16])
    numel = rng.integers(100, 1000, units) * 8
    return Problem(
        error=rng.lognormal(0, 1, (units, 1)) * 4.0 ** -bits[None, :] * 1e4,
        bytes=numel[:, None] * bits[None, :] // 8,
        numel=numel,
        unit_names=[f"layer{u}" for u in range(units)],
        format_names=[f"int{b}" for b in bits],
    )


@st.composite
def medium_problems(draw: st.DrawFn) -> Problem:
    """Too big to enumerate, big enough that greedy is often not optimal:
    10-40 units, 3-8 formats, sizes from element counts and bit widths (with
    some irregular ones), errors falling with bits times a per-unit
    sensitivity over orders of magnitude; ilp is the reference."""
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    units, formats = int(rng.integers(10, 41)), int(rng.integers(3, 9))
    bits = np.sort(rng.choice(np.arange(2, 17), formats, replace=False))
    numel = rng.integers(1, 64, units) * 64
    size = numel[:, None] * bits[None, :] // 8 + rng.integers(0, 3, (units, formats)) * (numel[:, None] // 64)
    error = rng.lognormal(0, 2, (units, 1)) * 4.0 ** -bits[None, :] * rng.lognormal(0, 0.3, (units, formats))
    allowed = rng.random((units, formats)) < 0.9
    allowed[np.arange(units), rng.integers(0, formats, units)] = True
    ties = [list(rng.choice(units, 3, replace=False))] if rng.random() < 0.5 else []
    if ties:
        allowed[ties[0], int(rng.integers(0, formats))] = True
    return Problem(
        error=error, bytes=size, numel=numel, allowed=allowed, tie_groups=ties,
        latency=size / 1e3 + rng.random((units, formats)),
        unit_names=[f"unit{u}" for u in range(units)], format_names=[f"b{b}" for b in bits],
    )


def scalar_measure(objective):
    """A ``search.Measure`` of one window from a plain objective of the allocation."""
    return lambda allocation, samples: np.array([objective(allocation)])

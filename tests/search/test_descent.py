"""descent: proximal steps on a local model of a measured objective."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from search_instances import assert_valid, enumerate_allocations, problems, scalar_measure, small_model

from bitalloc.search import Allocation, Budgets, solve
from bitalloc.search.solvers.descent import shifted

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def interacting(problem, signs: np.ndarray, weight: float):
    """A measured objective that is not additive: the proxy plus the square of a signed
    sum over units (a shared output perturbation, as quantized layers make together)."""

    def evaluate(allocation: Allocation, samples: int = 0) -> float:
        rows = np.arange(problem.n_units)
        push = signs[rows, np.asarray(allocation.choice)].sum()
        return allocation.error + weight * push**2

    return evaluate


def coordinate_model(problem, evaluate):
    """The exact change of ``evaluate`` when one unit moves and the rest stay: a first-order
    model that knows the interactions at the current allocation."""

    def linear(allocation: Allocation) -> np.ndarray:
        here = evaluate(allocation)
        cells = np.zeros(problem.error.shape)
        for i in range(problem.n_units):
            for f in range(problem.error.shape[1]):
                choice = list(allocation.choice)
                choice[i] = f
                cells[i, f] = evaluate(Allocation.of(problem, choice)) - here
        return cells

    return linear


@FAST
@given(problems(max_units=5), st.data(), st.integers(0, 1000))
def test_descent_respects_budgets_and_is_never_worse_than_its_start(problem, data, seed) -> None:
    every = enumerate_allocations(problem)
    budgets = Budgets(max_bytes=int(every.bytes[data.draw(st.integers(0, len(every.choices) - 1))]))
    rng = np.random.default_rng(seed)
    evaluate = interacting(problem, rng.normal(size=problem.error.shape), weight=float(rng.uniform(0, 50)))
    linear = (lambda a: rng.normal(size=problem.error.shape)) if seed % 2 else coordinate_model(problem, evaluate)
    result = solve(problem, budgets, solver="descent", measure=scalar_measure(evaluate), linear=linear, samples=8)
    assert_valid(problem, result, budgets)
    start = solve(problem, budgets, solver="dp")
    assert result.info["start_measured"] == evaluate(start)
    assert result.measured == evaluate(result) <= evaluate(start)


def test_descent_finds_the_interaction_the_proxy_cannot_see() -> None:
    """Low formats push a shared output one way or the other, unit by unit, and the measured
    objective pays the square of the sum: the proxy optimum is blind to it. With the exact
    local model, descent gets within a tenth of the gap to the brute-force optimum."""
    problem = small_model(units=6)
    signs = np.random.default_rng(3).normal(size=problem.error.shape) * [2.0, 1.0, 0.3, 0.0]
    evaluate = interacting(problem, signs, weight=20 * float(np.median(problem.error[problem.error > 0])))
    budgets = Budgets(max_avg_bits=5.0)
    start = solve(problem, budgets)
    result = solve(problem, budgets, solver="descent", measure=scalar_measure(evaluate), linear=coordinate_model(problem, evaluate),
                   samples=1, steps=(0.1, 0.3, 1.0), iterations=5)
    every = (Allocation.of(problem, c) for c in itertools.product(range(4), repeat=problem.n_units))
    best = min(evaluate(a) for a in every if a.avg_bits <= 5.0 + 1e-9)
    assert result.measured < evaluate(start)
    assert result.measured <= best + 0.1 * (evaluate(start) - best)
    assert result.info["iterations"][0]["accepted"] in (0.1, 0.3, 1.0)


class ByWindow:
    """A measurement window by window: ``base(allocation)`` in every window, plus ``gain`` per
    window for every allocation other than ``start`` (a move's effect as four texts see it)."""

    def __init__(self, base, start: Allocation, gain: list[float]) -> None:
        self.base, self.start, self.gain = base, start, np.asarray(gain)

    def __call__(self, allocation: Allocation, samples: int) -> np.ndarray:
        moved = allocation.choice != self.start.choice
        return self.base(allocation) + (self.gain if moved else 0.0) + np.zeros(len(self.gain))


@pytest.mark.parametrize("gain, confidence, moves", [
    ([-3.0, 0.5, 0.5, 0.5], 0.95, False),  # lower on average, by one window only: noise a search would fit
    ([-3.0, 0.5, 0.5, 0.5], None, True),  # a bare comparison of means takes it
    ([-1.0, -0.9, -1.1, -0.95], 0.95, True),  # lower in every window: taken
])
def test_a_step_must_be_lower_across_the_windows(gain, confidence, moves) -> None:
    problem = small_model()
    budgets = Budgets(max_avg_bits=5.0)
    start = solve(problem, budgets)
    evaluate = ByWindow(lambda a: 10.0, start, gain)
    rng = np.random.default_rng(0)
    result = solve(problem, budgets, solver="descent", measure=evaluate, samples=4, iterations=1, confidence=confidence,
                   linear=lambda a: rng.normal(size=problem.error.shape) * problem.error.max())
    step = result.info["iterations"][0]
    assert step["candidates"]  # the random local model did propose moves
    assert (result.choice != start.choice) == moves == ("accepted" in step)
    assert result.measured == pytest.approx(10.0 + np.mean(gain) if moves else 10.0)
    if confidence is not None:
        assert (step["p_value"] < 1 - confidence) == moves


def test_descent_finds_the_interaction_through_a_paired_test() -> None:
    """The interaction test again, measured on four windows that see it with a little noise
    each: consistent gains pass the paired test, so descent still closes most of the gap."""
    problem = small_model(units=6)
    signs = np.random.default_rng(3).normal(size=problem.error.shape) * [2.0, 1.0, 0.3, 0.0]
    truth = interacting(problem, signs, weight=20 * float(np.median(problem.error[problem.error > 0])))
    budgets = Budgets(max_avg_bits=5.0)
    start = solve(problem, budgets)

    def noisy(allocation: Allocation, samples: int) -> np.ndarray:
        jitter = np.random.default_rng(list(allocation.choice)).normal(size=4)
        return truth(allocation) * (1 + 0.01 * jitter)

    result = solve(problem, budgets, solver="descent", measure=noisy, linear=coordinate_model(problem, truth),
                   samples=4, steps=(0.1, 0.3, 1.0), iterations=5)
    every = (Allocation.of(problem, c) for c in itertools.product(range(4), repeat=problem.n_units))
    best = min(truth(a) for a in every if a.avg_bits <= 5.0 + 1e-9)
    assert truth(result) <= best + 0.2 * (truth(start) - best)


def test_descent_stops_where_no_step_helps() -> None:
    problem = small_model()
    budgets = Budgets(max_avg_bits=5.0)
    evaluate = interacting(problem, np.zeros(problem.error.shape), weight=0.0)  # the proxy itself: the start is optimal
    result = solve(problem, budgets, solver="descent", measure=scalar_measure(evaluate), linear=lambda a: np.zeros(problem.error.shape),
                   samples=4, iterations=3)
    assert result.choice == solve(problem, budgets).choice
    assert len(result.info["iterations"]) == 1 and "accepted" not in result.info["iterations"][0]


@pytest.mark.parametrize("options, message", [({"steps": ()}, "steps"), ({"steps": (0.3, -1.0)}, "steps"),
                                              ({"iterations": 0}, "iterations"), ({"samples": 0}, "samples"),
                                              ({"confidence": 1.0}, "confidence"), ({"confidence": 0.0}, "confidence")])
def test_descent_rejects_bad_options(options, message) -> None:
    with pytest.raises(ValueError, match=message):
        solve(small_model(), Budgets(), solver="descent", **{"measure": lambda a, n: np.zeros(1), "linear": lambda a: 0,
                                                             "samples": 8, **options})


def test_descent_refuses_an_error_budget() -> None:
    with pytest.raises(ValueError, match="max_error"):
        solve(small_model(), Budgets(max_error=1.0), solver="descent", measure=lambda a, n: np.zeros(1),
              linear=lambda a: 0, samples=8)


def test_shifted_rows_start_at_zero_where_allowed() -> None:
    cells = np.array([[-3.0, 1.0, 5.0], [2.0, -7.0, 0.0]])
    allowed = np.array([[False, True, True], [True, True, True]])
    assert shifted(cells, allowed).tolist() == [[0.0, 0.0, 4.0], [9.0, 0.0, 7.0]]

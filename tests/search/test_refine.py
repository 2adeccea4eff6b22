"""refine: evolutionary refinement by a measured objective."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from search_instances import assert_valid, enumerate_allocations, problems, small_model

from bitalloc.search import Allocation, Budgets, front, refine_front, solve

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SCHEDULE = ((4, 3), (16, 1))


def noisy(seed: int):
    """A measured objective that disagrees with the proxy, deterministic per
    (allocation, samples), noisier with fewer samples."""

    def evaluate(allocation: Allocation, samples: int) -> float:
        key = zlib.crc32(repr((seed, allocation.choice, samples)).encode())
        return allocation.error * (1 + (key % 1000) / 1000) + 10.0 / samples * ((key >> 10) % 7)

    return evaluate


@FAST
@given(problems(max_units=6), st.data(), st.integers(0, 1000))
def test_refine_respects_budgets_and_is_never_worse_than_its_start(problem, data, seed) -> None:
    every = enumerate_allocations(problem)
    budgets = Budgets(max_bytes=int(every.bytes[data.draw(st.integers(0, len(every.choices) - 1))]))
    evaluate = noisy(seed)
    refined = solve(problem, budgets, solver="refine", measure=lambda a, n: np.array([evaluate(a, n)]), generations=6, offspring=6, schedule=SCHEDULE, seed=seed)
    assert_valid(problem, refined, budgets)
    start = solve(problem, budgets, solver="dp")
    assert refined.info["start_measured"] == evaluate(start, 16)
    assert refined.measured == evaluate(refined, 16) <= evaluate(start, 16)


def test_refine_finds_what_the_proxy_misses() -> None:
    """The measured objective penalises the proxy optimum's choice for one
    unit; refinement moves away from it within the same budget."""
    problem = small_model(units=8)
    budgets = Budgets(max_avg_bits=5.0)
    start = solve(problem, budgets)
    penalised = start.choice[0]

    def evaluate(allocation: Allocation, samples: int) -> float:
        return allocation.error + (1e3 if allocation.choice[0] == penalised else 0.0)

    refined = solve(problem, budgets, solver="refine", measure=lambda a, n: np.array([evaluate(a, n)]), generations=30, seed=1)
    assert refined.choice[0] != penalised
    assert refined.measured < evaluate(start, 2048)
    assert refined.avg_bits <= 5.0


def test_refine_front_with_no_generations_measures_and_reranks() -> None:
    problem = small_model()
    exact = front(problem, points=8)
    measured = refine_front(problem, exact, lambda a, n: np.array([-a.error]), generations=0, schedule=((8, 1),))
    assert measured.axes == ("measured", "bytes")
    # Negated error: only the smallest allocation is not dominated by measurement.
    assert len(measured) == 1 and measured[0].bytes == min(a.bytes for a in exact)


@pytest.mark.parametrize("schedule", [(), ((8, 2),), ((16, 2), (8, 1)), ((8, 1), (16, 2))])
def test_refine_rejects_a_schedule_that_does_not_narrow_to_one(schedule) -> None:
    with pytest.raises(ValueError, match="schedule"):
        solve(small_model(), Budgets(), solver="refine", measure=lambda a, n: np.zeros(1), schedule=schedule)


@given(smallest=st.integers(1, 5000), final=st.integers(1, 20000))
def test_staged_schedule_is_always_a_valid_schedule_ending_at_the_final_size(smallest, final) -> None:
    from bitalloc.search.solvers.refine import RefineSolver, staged_schedule

    schedule = staged_schedule(smallest, final)
    RefineSolver(lambda _a, _n: 0.0, schedule=schedule)  # raises on an invalid schedule
    assert schedule[-1] == (final, 1)
    assert all(samples >= min(smallest, final) for samples, _ in schedule)
    assert staged_schedule(512, 4096) == ((512, 4), (1024, 2), (4096, 1))

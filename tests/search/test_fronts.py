"""Pareto utilities and fronts against brute force."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from search_instances import assert_valid, enumerate_allocations, problems

from bitalloc.search import Budgets, Front, front, hypervolume, non_dominated

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
points = st.integers(2, 3).flatmap(lambda k: arrays(np.float64, st.tuples(st.integers(1, 12), st.just(k)), elements=st.integers(0, 5).map(float)))


@FAST
@given(points)
def test_non_dominated_keeps_exactly_the_points_nothing_beats_once_each(values) -> None:
    kept = set(non_dominated(values).tolist())
    for i, p in enumerate(values):
        beaten = any(np.all(q <= p) and np.any(q < p) for q in values)
        duplicate_of_earlier = any(np.array_equal(values[j], p) for j in range(i))
        assert (i in kept) == (not beaten and not duplicate_of_earlier)


@FAST
@given(points)
def test_hypervolume_is_the_measure_of_the_dominated_box_union(values) -> None:
    reference = np.full(values.shape[1], 6.0)
    # Integer coordinates: count the unit cells dominated by some point.
    cells = itertools.product(range(6), repeat=values.shape[1])
    expected = sum(any(np.all(p <= np.array(c)) for p in values) for c in cells)
    assert hypervolume(values, reference) == pytest.approx(expected)


@FAST
@given(problems(), st.sampled_from(["dp", "ilp"]))
def test_exact_front_points_are_optimal_for_their_own_size_and_not_dominated(problem, solver) -> None:
    every = enumerate_allocations(problem)
    result = front(problem, solver=solver, points=8)
    assert len(result) >= 1
    sizes = result.points()[:, 1]
    assert np.all(np.diff(sizes) > 0)
    assert np.all(np.diff(result.points()[:, 0]) < 0)
    for allocation in result:
        assert_valid(problem, allocation, Budgets())
        within = every.bytes <= allocation.bytes
        assert allocation.error <= every.error[within].min() + problem.tolerance("error")
    # Its ends are the cheapest allocation and the most accurate one.
    assert sizes[0] == every.bytes.min()
    assert result.points()[-1, 0] <= every.error.min() + problem.tolerance("error")


@FAST
@given(problems())
def test_greedy_front_points_lie_on_the_exact_front(problem) -> None:
    every = enumerate_allocations(problem)
    for allocation in front(problem, solver="greedy", points=16):
        within = every.bytes <= allocation.bytes
        assert allocation.error <= every.error[within].min() + problem.tolerance("error")


@FAST
@given(problems(max_units=4, max_formats=3))
def test_a_three_axis_sweep_is_non_dominated_and_valid(problem) -> None:
    axes = ("error", "bytes", "latency")
    result = front(problem, axes=axes, solver="ilp", points=9)
    values = result.points()
    assert len(non_dominated(values)) == len(values)
    every = enumerate_allocations(problem)
    for allocation in result:
        better = (every.bytes <= allocation.bytes) & (every.latency <= allocation.latency)
        assert allocation.error <= every.error[better].min() + problem.tolerance("error")


@FAST
@given(problems())
def test_front_round_trips_through_json(problem) -> None:
    original = front(problem, points=6)
    restored = Front.from_dict(json.loads(json.dumps(original.to_dict())), problem)
    assert restored.axes == original.axes
    assert [a.choice for a in restored] == [a.choice for a in original]
    assert np.array_equal(restored.points(), original.points())


@FAST
@given(problems(), st.data(), st.sampled_from(["dp", "ilp", "greedy"]))
def test_a_front_within_a_budget_stays_inside_it(problem, data, solver) -> None:
    every = enumerate_allocations(problem)
    cap = int(every.bytes[data.draw(st.integers(0, len(every.choices) - 1))])
    result = front(problem, budgets=Budgets(max_bytes=cap), solver=solver, points=6)
    assert len(result) >= 1
    assert all(a.bytes <= cap for a in result)

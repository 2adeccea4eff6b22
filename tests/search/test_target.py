"""Accuracy-target mode: the smallest allocation meeting an error target."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from search_instances import enumerate_allocations, problems, scalar_measure, small_model

from bitalloc.search import Budgets, InfeasibleBudget, smallest_within, solve
from bitalloc.search.sweep import budget_range

FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(problems(), st.data(), st.sampled_from(["dp", "ilp"]))
def test_predicted_target_gives_the_smallest_allocation_meeting_it(problem, data, solver) -> None:
    every = enumerate_allocations(problem)
    target = float(every.error[data.draw(st.integers(0, len(every.choices) - 1))])
    found = smallest_within(problem, target, solver=solver)
    assert found.error <= target + problem.tolerance("error")
    assert found.bytes <= every.bytes[every.error <= target].min()


@pytest.mark.parametrize("steps", [4, 12])
def test_measured_target_bisects_to_within_its_resolution(steps) -> None:
    problem = small_model(units=8)
    measure = lambda a: 3.0 * a.error  # noqa: E731  (a measured scale unlike the proxy's)
    lo, hi = budget_range(problem, "error", "bytes")
    target = measure(solve(problem, Budgets(max_bytes=int((lo + 2 * hi) / 3))))
    found = smallest_within(problem, target, measure=scalar_measure(measure), steps=steps)
    assert found.measured == measure(found) <= target
    # One resolution step smaller misses the target (the measure falls with the budget here).
    resolution = -(-(int(hi) - int(lo)) // 2**steps)
    smaller = solve(problem, Budgets(max_bytes=found.bytes - resolution - 1))
    assert measure(smaller) > target


def test_a_target_the_best_allocation_misses_raises_with_its_measured_error() -> None:
    problem = small_model()
    with pytest.raises(InfeasibleBudget) as raised:
        smallest_within(problem, 1.0, measure=scalar_measure(lambda a: 5.0 + a.error))
    assert raised.value.budget == "max_error"
    assert raised.value.smallest == pytest.approx(5.0 + solve(problem).error)


def test_windowed_target_holds_with_confidence_not_on_the_mean() -> None:
    """Measured window by window, the answer must meet the target by a one-sided t-test over
    the windows (checked here with scipy's one-sample test, not the search's bound), which
    costs more bytes than meeting it on the mean; without confidence it is the mean's answer."""
    from scipy.stats import ttest_1samp

    problem = small_model(units=8)
    spread = np.array([-1.5, -0.8, -0.3, 0.0, 0.2, 0.6, 0.8, 1.0])  # mean 0: the mean is 3 * error
    windows = lambda a: 3.0 * a.error * (1 + 0.3 * spread)  # noqa: E731
    lo, hi = budget_range(problem, "error", "bytes")
    target = 3.0 * solve(problem, Budgets(max_bytes=int((lo + 2 * hi) / 3))).error
    found = smallest_within(problem, target, measure=lambda a, n: windows(a), steps=12)
    assert ttest_1samp(windows(found), target, alternative="less").pvalue <= 0.05
    assert found.measured == pytest.approx(3.0 * found.error) and found.info["measured_bound"] <= target
    resolution = -(-(int(hi) - int(lo)) // 2**12)
    smaller = solve(problem, Budgets(max_bytes=found.bytes - resolution - 1))
    assert ttest_1samp(windows(smaller), target, alternative="less").pvalue > 0.05
    on_the_mean = smallest_within(problem, target, measure=lambda a, n: windows(a), steps=12, confidence=None)
    assert on_the_mean.bytes < found.bytes
    assert on_the_mean.choice == smallest_within(problem, target, measure=scalar_measure(lambda a: 3.0 * a.error), steps=12).choice


@pytest.mark.parametrize("confidence", [0.0, 1.0, 1.5])
def test_a_confidence_outside_0_1_is_refused(confidence) -> None:
    with pytest.raises(ValueError, match="confidence"):
        smallest_within(small_model(), 1.0, measure=scalar_measure(lambda a: a.error), confidence=confidence)

"""HAWQ-V3 (ILP = brute force) and rescoring; NNCF's ratio-by-parameters selection."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from bitalloc.search import Budgets, InfeasibleBudget, Problem
from bitalloc.search.baselines import UnitInfo, hawq_v3, nncf_ratio, primary_prefix, rescore


def tiny(seed: int = 0, ties=()) -> Problem:
    rng = np.random.default_rng(seed)
    units = 5
    numel = rng.integers(50, 500, units)
    bits = np.array([2, 4, 8])
    size = (numel[:, None] * bits[None, :]) // 8
    trace = rng.uniform(0.01, 1.0, units)
    perturbation = rng.uniform(0.5, 2.0, (units, 1)) * 4.0 ** (-bits)[None, :] * numel[:, None]
    return Problem(error=trace[:, None] / numel[:, None] * perturbation, bytes=size, numel=numel,
                   unit_names=[f"u{i}" for i in range(units)], format_names=["int2", "int4", "int8"], tie_groups=ties)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("target", [3.0, 4.5, 6.0])
def test_hawq_v3_ilp_equals_brute_force(seed, target):
    problem = tiny(seed, ties=[[0, 1]] if seed % 2 else [])
    cap = Budgets(max_avg_bits=target).byte_cap(problem.total_numel)
    best = min(
        (problem.error[np.arange(problem.n_units), c].sum(), c)
        for c in itertools.product(range(problem.n_formats), repeat=problem.n_units)
        if problem.bytes[np.arange(problem.n_units), c].sum() <= cap
        and all(len({c[u] for u in t}) == 1 for t in problem.tie_groups)
    )
    a = hawq_v3(problem, Budgets(max_avg_bits=target))
    assert a.solver == "hawq_v3" and a.info["optimal"]
    assert a.avg_bits <= target
    assert a.error == pytest.approx(best[0], rel=1e-9, abs=1e-12)


def test_rescore_keeps_formats_and_takes_the_other_problems_error():
    trace = tiny(1)
    other = Problem(error=np.arange(15, dtype=float).reshape(5, 3), bytes=trace.bytes, numel=trace.numel,
                    unit_names=trace.unit_names, format_names=trace.format_names)
    a = hawq_v3(trace, Budgets(max_avg_bits=4.0))
    b = rescore(a.with_measured(0.5), other)
    assert b.formats == a.formats and b.bytes == a.bytes and b.solver == "hawq_v3" and b.measured == 0.5
    assert b.error == pytest.approx(sum(other.error[u, f] for u, f in enumerate(a.choice)))
    renamed = Problem(error=other.error, bytes=other.bytes, numel=other.numel, unit_names=list("abcde"),
                      format_names=other.format_names)
    with pytest.raises(ValueError, match="units do not match"):
        rescore(a, renamed)


# --- NNCF -----------------------------------------------------------------------------

def nncf_problem(extra: tuple[str, ...] = ()) -> tuple[Problem, dict[str, UnitInfo]]:
    """Four layers of 100, 200, 300, 400 parameters (+ kept layers of 1000), int4 = 4 bits, int8 = 8 bits."""
    numel = [100, 200, 300, 400] + [1000] * len(extra)
    names = [f"l{i}" for i in range(4)] + list(extra)
    sizes = np.array([[n // 2, n] for n in numel])
    problem = Problem(error=np.zeros((len(numel), 2)), bytes=sizes, numel=numel, unit_names=names,
                      format_names=["int4", "int8"])
    infos = {n: UnitInfo(block=i, kind="ffn_down") for i, n in enumerate(names[:4])}
    infos.update({n: UnitInfo(kind=n) for n in extra})
    return problem, infos


SCORES = {"l0": 0.3, "l1": 0.1, "l2": 0.4, "l3": 0.2}  # ascending: l1 (200), l3 (400), l0 (100), l2 (300)


@pytest.mark.parametrize(("ratio", "low"), [
    (0.1, set()),                    # l1 alone is 0.2 >= 0.1: stop at once
    (0.5, {"l1"}),                   # l1+l3 = 0.6 >= 0.5: stop there, even though l0 (0.1) would still fit
    (0.7, {"l1", "l3"}),             # adding l0 reaches 0.7 exactly: >= stops it
    (0.71, {"l1", "l3", "l0"}),
    (1.0, {"l0", "l1", "l2", "l3"}),  # ratio 1: every ratio-defining layer
])
def test_nncf_ranks_by_ascending_score_and_counts_parameters(ratio, low):
    problem, infos = nncf_problem()
    a = nncf_ratio(problem, infos, SCORES, "int4", "int8", ratio=ratio)
    assert {u for u, f in a.formats.items() if f == "int4"} == low
    assert a.info["low_share"] == pytest.approx(sum(problem.numel[int(u[1])] for u in low) / 1000)


def test_primary_prefix_is_stable_on_equal_scores():
    assert primary_prefix(np.array([1.0, 1.0, 0.5]), np.array([10, 10, 10]), 0.9) == [2, 0]


def test_nncf_keeps_embeddings_and_the_last_layer_at_the_backup_width_unless_all_layers():
    problem, infos = nncf_problem(extra=("token_embd", "output"))
    scores = {**SCORES, "token_embd": 0.0, "output": 0.0}  # least sensitive of all, still kept
    a = nncf_ratio(problem, infos, scores, "int4", "int8", ratio=0.5)
    assert a.formats["token_embd"] == a.formats["output"] == "int8"
    assert {u for u, f in a.formats.items() if f == "int4"} == {"l1"}  # the ratio counts only l0..l3
    assert sorted(a.info["kept_high"]) == ["output", "token_embd"]
    b = nncf_ratio(problem, infos, scores, "int4", "int8", ratio=0.5, all_layers=True)
    # now 3000 parameters: token_embd (1000) then output (1000) would make 2/3 >= 0.5
    assert {u for u, f in b.formats.items() if f == "int4"} == {"token_embd"}


@pytest.mark.parametrize("target", [5.0, 6.0, 6.4, 7.5, 8.0])
def test_nncf_from_a_target_takes_the_most_bits_within_it(target):
    problem, infos = nncf_problem()
    a = nncf_ratio(problem, infos, SCORES, "int4", "int8", target_avg_bits=target)
    assert a.avg_bits <= target
    # the same assignment follows from NNCF's own loop at the reported ratio
    again = nncf_ratio(problem, infos, SCORES, "int4", "int8", ratio=a.info["ratio"])
    assert again.choice == a.choice
    # one layer fewer in int4 (the last taken, in score order) would exceed the target
    order = ["l1", "l3", "l0", "l2"]
    low = [u for u in order if a.formats[u] == "int4"]
    assert low == order[:len(low)]
    if low:
        back = problem.numel[int(low[-1][1])] // 2
        assert 8 * (a.bytes + back) / problem.total_numel > target


def test_nncf_input_errors():
    problem, infos = nncf_problem()
    with pytest.raises(ValueError, match="exactly one"):
        nncf_ratio(problem, infos, SCORES, "int4", "int8")
    with pytest.raises(ValueError, match="no value"):
        nncf_ratio(problem, infos, {"l0": 1.0}, "int4", "int8", ratio=0.5)
    with pytest.raises(InfeasibleBudget):
        nncf_ratio(problem, infos, SCORES, "int4", "int8", target_avg_bits=3.0)

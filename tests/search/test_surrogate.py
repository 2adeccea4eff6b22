"""surrogate: a fitted model of measured KL with pairwise terms, solved exactly, in a loop that
never returns worse than its start."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from search_instances import assert_valid, enumerate_allocations

from bitalloc.search import Allocation, Budgets, Problem, solve
from bitalloc.search.solvers.surrogate.exact import minimise
from bitalloc.search.solvers.surrogate.layout import Layout, kind_name
from bitalloc.search.solvers.surrogate.model import Cells, InteractionModel, held_out
from bitalloc.search.solvers.surrogate.sampler import NEAR, Sampler

KINDS = ("attn.qkv", "attn.out", "mlp.down")


def layered(blocks: int, bits=(2, 3, 4, 6, 8), seed: int = 0, ties: bool = False) -> Problem:
    """A model-like problem: ``blocks`` blocks of ``KINDS`` plus a head outside them."""
    rng = np.random.default_rng(seed)
    names = [f"net.blocks.{b}.{k}" for b in range(blocks) for k in KINDS] + ["head"]
    bits = np.array(bits)
    numel = rng.integers(4, 16, len(names)) * 64
    error = rng.lognormal(0, 0.7, (len(names), 1)) * 2.0 ** -bits[None, :]
    tie_groups = [[3 * b, 3 * b + 1] for b in range(blocks)] if ties else []
    size = numel[:, None] * bits[None, :] // 8
    return Problem(error, size, numel, names, [f"int{b}" for b in bits], tie_groups=tie_groups,
                   latency=size * rng.uniform(0.5, 1.5, size.shape))


def true_objective(problem: Problem, scale: dict[str, float], weight: dict[tuple[str, str, int], float]):
    """Measured KL by construction: a scale per kind times each unit's cell, plus
    ``weight[kind, kind, offset] * sqrt(e_u e_v)`` for units at most one block apart; written
    from the unit names alone, not from the solver's layout."""
    parts = [name.split(".") for name in problem.unit_names]
    placed = [(int(p[2]), ".".join(p[3:])) if len(p) > 3 else (None, p[0]) for p in parts]

    def evaluate(choice) -> float:
        cells = problem.error[np.arange(problem.n_units), np.asarray(choice)]
        total = sum(scale[kind] * e for (_, kind), e in zip(placed, cells))
        for u, v in itertools.combinations(range(problem.n_units), 2):
            (bu, ku), (bv, kv) = placed[u], placed[v]
            if bu is None or bv is None or abs(bu - bv) > 1:
                continue
            if bv < bu or (bv == bu and kv < ku):
                (bu, ku), (bv, kv), u, v = (bv, kv), (bu, ku), v, u
            total += weight.get((ku, kv, bv - bu), 0.0) * np.sqrt(cells[u] * cells[v])
        return float(total)

    return evaluate


def windowed(evaluate, windows: int = 8, noise: float = 0.002, seed: int = 0):
    """A measure over ``windows`` windows: each window sees the objective at its own slightly
    different level (as text windows do), so paired differences are consistent."""
    level = 1 + np.random.default_rng(seed).normal(0, noise, windows)

    def measure(allocation: Allocation, samples: int) -> np.ndarray:
        return evaluate(allocation.choice) * level

    return measure


def test_kinds_mask_the_block_component_and_pairs_reach_the_next_block():
    names = ["model.layers.0.mlp.down_proj", "model.layers.0.self_attn.o_proj", "model.layers.1.mlp.down_proj",
             "model.layers.3.mlp.down_proj", "lm_head"]
    layout = Layout.of(names, [0, 0, 1, 3, None])
    assert layout.kind_names == ("model.layers.*.mlp.down_proj", "model.layers.*.self_attn.o_proj", "lm_head")
    pairs = {tuple(p) for p in layout.pairs.tolist()}
    assert pairs == {(0, 1), (0, 2), (1, 2)}  # block 3 is two blocks away, lm_head in none
    assert len(layout.class_names) == 3 and len(Layout.of(names).pairs) == 0
    assert kind_name("h.12.attn.c_proj", 12) == "h.*.attn.c_proj"
    with pytest.raises(ValueError, match="no path component 4"):
        kind_name("model.layers.3.mlp", 4)


def test_samples_are_distinct_valid_allocations_near_the_budget():
    problem = layered(blocks=4, ties=True)
    budgets = Budgets(max_avg_bits=4.5)
    start = problem.groups.collapse(np.array(solve(problem, budgets).choice))
    sampled = Sampler(problem, budgets, seed=3).sample([start], 30)
    assert len(sampled) == 30 and len({tuple(c) for c in sampled}) == 30 and (sampled[0] == start).all()
    cap = budgets.byte_cap(problem.total_numel)
    uniform = [c for c in sampled if len(set(c.tolist())) == 1]
    for choice in sampled:
        allocation = Allocation.of(problem, problem.groups.expand(choice, problem.n_units))
        assert not problem.violations(allocation.choice, budgets)
    assert uniform and all(NEAR * cap <= Allocation.of(problem, problem.groups.expand(c, problem.n_units)).bytes
                           for c in uniform)  # int4 everywhere, never int2 or int3


def test_the_fit_recovers_known_scales_and_pairwise_terms():
    problem = layered(blocks=4)
    scale = {"attn.qkv": 1.5, "attn.out": 0.8, "mlp.down": 1.1, "head": 1.0}
    weight = {("attn.out", "attn.qkv", 0): 0.6, ("mlp.down", "attn.qkv", 1): 0.4, ("attn.qkv", "mlp.down", 0): 0.3}
    evaluate = true_objective(problem, scale, weight)
    rng = np.random.default_rng(1)
    choices = rng.integers(0, problem.n_formats, (300, problem.n_units))
    measured = np.array([evaluate(c) for c in choices]) * (1 + rng.normal(0, 1e-3, len(choices)))
    layout = Layout.of(problem.unit_names, [int(n.split(".")[2]) if "." in n else None for n in problem.unit_names])
    cells = InteractionModel(problem.error, layout).fit(choices, measured).cells()

    kinds = [n.split(".", 3)[-1] if "." in n else n for n in problem.unit_names]
    expected_scale = np.array([scale[k] for k in kinds])
    # a constant per unit is a constant of the whole model (each unit takes one format): compare the
    # differences between formats, to 5 %, or 1 % of the largest cell
    def centred(table):
        return table - table.mean(axis=1, keepdims=True)

    np.testing.assert_allclose(centred(cells.linear), centred(expected_scale[:, None] * problem.error), rtol=0.05,
                               atol=0.01 * problem.error.max())
    roots = np.sqrt(problem.error)
    for (u, v), table in zip(cells.pairs, cells.pair):
        (bu, ku), (bv, kv) = [(int(problem.unit_names[w].split(".")[2]), kinds[w]) for w in (u, v)]
        truth = weight.get((ku, kv, bv - bu), 0.0) * np.outer(roots[u], roots[v])
        np.testing.assert_allclose(table, truth, atol=0.05 * roots.max() ** 2)
    fresh = rng.integers(0, problem.n_formats, (50, problem.n_units))
    assert held_out(problem.error, layout, choices, measured)["spearman"] > 0.99
    predicted = InteractionModel(problem.error, layout).fit(choices, measured).predict(fresh)
    np.testing.assert_allclose(predicted, [evaluate(c) for c in fresh], rtol=0.02)


@pytest.mark.parametrize("seed", range(6))
def test_the_exact_solve_finds_the_brute_force_optimum_of_the_model(seed):
    problem = layered(blocks=2, bits=(2, 4, 8), seed=seed, ties=seed % 2 == 1)
    rng = np.random.default_rng(seed)
    layout = Layout.of(problem.unit_names, [0, 0, 0, 1, 1, 1, None])
    cells = Cells(constant=0.0, linear=rng.normal(0, 1, problem.error.shape), pairs=layout.pairs,
                  pair=rng.normal(0, 1, (len(layout.pairs), problem.n_formats, problem.n_formats)))
    every = enumerate_allocations(problem)
    budgets = Budgets(max_bytes=int(np.quantile(every.bytes, 0.4)),
                      max_latency=float(np.quantile(every.latency, 0.5)) if seed % 3 == 0 else None)
    values = np.array([cells.value(c) for c in every.choices])
    best = values[every.meets(budgets)].min()
    solution = minimise(problem, budgets, cells)
    assert solution.optimal
    assert not problem.violations(solution.choice, budgets)
    assert cells.value(solution.choice) == pytest.approx(best, abs=1e-6 * np.abs(values).max())

    # within a trust region of one group around the profile's own optimum
    centre = every.choices[every.meets(budgets)][np.argmin(every.error[every.meets(budgets)])]
    groups = problem.groups
    moved = np.array([(groups.collapse(c) != groups.collapse(centre)).sum() for c in every.choices])
    near = values[every.meets(budgets) & (moved <= 1)].min()
    local = minimise(problem, budgets, cells, around=centre, radius=1)
    assert (groups.collapse(local.choice) != groups.collapse(centre)).sum() <= 1
    assert cells.value(local.choice) == pytest.approx(near, abs=1e-6 * np.abs(values).max())

    # the measured allocations excluded: the best of the rest, then nothing once all are excluded
    feasible = every.choices[every.meets(budgets)]
    ranked = feasible[np.argsort([cells.value(c) for c in feasible], kind="stable")]
    second = minimise(problem, budgets, cells, exclude=list(ranked[:3]))
    assert cells.value(second.choice) == pytest.approx(cells.value(ranked[3]), abs=1e-6 * np.abs(values).max())
    assert minimise(problem, budgets, cells, exclude=list(feasible)) is None


def test_the_loop_finds_what_the_sum_misses_and_keeps_within_the_budget():
    problem = layered(blocks=4, ties=True)
    scale = {"attn.qkv": 0.5, "attn.out": 0.5, "mlp.down": 2.5, "head": 1.0}
    evaluate = true_objective(problem, scale, {("mlp.down", "mlp.down", 1): 3.0})
    budgets = Budgets(max_avg_bits=4.0)
    start = solve(problem, budgets)
    result = solve(problem, budgets, solver="surrogate", measure=windowed(evaluate), samples=64, initial=30, rounds=6,
                   blocks=[int(n.split(".")[2]) if "." in n else None for n in problem.unit_names])
    assert_valid(problem, result, budgets)
    assert result.info["start_measured"] == pytest.approx(evaluate(start.choice), rel=0.01)
    assert result.info["confirmed"] and evaluate(result.choice) < 0.95 * evaluate(start.choice)
    assert result.info["held_out"]["spearman"] > result.info["held_out"]["additive_spearman"]


def test_the_loop_never_returns_worse_than_its_start():
    """The start is the measure's own optimum: whatever the model suggests, the start comes back."""
    problem = layered(blocks=3)
    budgets = Budgets(max_avg_bits=5.0)
    start = solve(problem, budgets)

    def away(choice) -> float:  # grows with every unit moved off the start
        return 1.0 + float(np.sum(np.asarray(choice) != np.asarray(start.choice)))

    result = solve(problem, budgets, solver="surrogate", measure=windowed(away, noise=0.05), samples=64, initial=12,
                   rounds=3, start=start, seeds=[solve(problem, Budgets(max_avg_bits=4.0))])
    assert result.choice == start.choice and not result.info["confirmed"]
    assert result.measured == pytest.approx(1.0, rel=0.2) and result.info["evaluations"] >= 12


def test_a_measure_of_one_window_is_refused():
    problem = layered(blocks=1)
    with pytest.raises(ValueError, match="at least two windows"):
        solve(problem, Budgets(max_avg_bits=5.0), solver="surrogate", measure=lambda a, s: np.ones(1), samples=1)


def test_a_search_at_a_smaller_budget_fits_on_what_a_larger_one_measured_and_keeps_its_own_budget():
    problem = layered(blocks=3)
    evaluate = true_objective(problem, {"attn.qkv": 1.0, "attn.out": 1.0, "mlp.down": 2.0, "head": 1.0},
                              {("mlp.down", "mlp.down", 1): 2.0})
    calls: list[tuple[int, ...]] = []

    def measure(allocation: Allocation, samples: int) -> np.ndarray:
        calls.append(tuple(allocation.choice))
        return windowed(evaluate)(allocation, samples)

    measured: dict = {}
    blocks = [int(n.split(".")[2]) if "." in n else None for n in problem.unit_names]
    large = solve(problem, Budgets(max_avg_bits=5.0), solver="surrogate", measure=measure, samples=64, initial=12,
                  rounds=2, blocks=blocks, measured=measured)
    assert large.info["reused"] == 0 and len(measured) == large.info["evaluations"] == len(calls)
    calls.clear()
    budgets = Budgets(max_avg_bits=4.0)
    small = solve(problem, budgets, solver="surrogate", measure=measure, samples=64, initial=12, rounds=2,
                  blocks=blocks, measured=measured)
    assert_valid(problem, small, budgets)  # the larger search's allocations are fitted on, never chosen
    assert small.info["reused"] == large.info["evaluations"]
    assert len(calls) == small.info["evaluations"] and not set(calls) & set(list(measured)[:small.info["reused"]])


def test_a_second_proxy_is_weighed_in_where_the_measure_follows_it():
    """KL that follows another metric's cells on some formats: the model with that proxy predicts
    it (and its exact minimum is the true one), the model without it cannot."""
    problem = layered(blocks=3)
    rng = np.random.default_rng(2)
    other = problem.error * rng.lognormal(0, 1.0, problem.error.shape)  # a proxy that ranks units otherwise
    mix = np.array([0.2, 0.5, 1.0, 1.0, 1.0])  # the measure follows ``other`` most at the low widths

    def evaluate(choice) -> float:
        rows = np.arange(problem.n_units)
        return float((problem.error[rows, choice] + mix[choice] * other[rows, choice]).sum())

    layout = Layout.of(problem.unit_names)
    choices = rng.integers(0, problem.n_formats, (200, problem.n_units))
    measured = np.array([evaluate(c) for c in choices])
    with_proxy = held_out(problem.error, layout, choices, measured, proxies=[other])
    without = held_out(problem.error, layout, choices, measured)
    assert with_proxy["relative_error"] < 0.01 < without["relative_error"]
    model = InteractionModel(problem.error, layout, proxies=[other]).fit(choices, measured)
    np.testing.assert_allclose(list(model.weights()["proxies"][0].values()), mix, rtol=0.05)

    budgets = Budgets(max_avg_bits=4.0)
    small = layered(blocks=1, bits=(2, 4, 8))
    small_other = small.error * rng.lognormal(0, 1.0, small.error.shape)
    weights = np.array([0.3, 1.0, 1.0])

    def small_evaluate(choice) -> float:
        rows = np.arange(small.n_units)
        return float((small.error[rows, choice] + weights[choice] * small_other[rows, choice]).sum())

    grid = enumerate_allocations(small)
    fitted = InteractionModel(small.error, Layout.of(small.unit_names), proxies=[small_other]).fit(
        grid.choices, [small_evaluate(c) for c in grid.choices])
    truth = np.array([small_evaluate(c) for c in grid.choices])
    best = truth[grid.meets(budgets)].min()
    found = minimise(small, budgets, fitted.cells())
    assert small_evaluate(found.choice) == pytest.approx(best, rel=1e-3)


def test_formats_are_pruned_exactly_however_many_pair_columns_compare_them():
    """A group with 40 partners of 7 formats compares each format on 280 columns (past what a
    Pareto library takes): what is dropped is exactly what a direct comparison drops, and a
    format whose every dominator is excluded stays."""
    from bitalloc.search.solvers.surrogate.exact import _undominated

    rng = np.random.default_rng(3)
    formats = np.arange(7)
    linear = rng.random((1, 7))  # group 0's own cost per format
    budgets = [np.array([[3, 1, 2, 4, 5, 6, 7]])]
    pairs = {(0, h): rng.random((7, 7)) * 1e-3 for h in range(1, 41)}
    pairs = {key: table + (np.arange(7)[:, None] == 4) * 1.0 for key, table in pairs.items()}  # format 4: worse everywhere
    linear[0, 4] = linear[0].max() + 1
    budgets[0][0, 4] = 9
    points = np.hstack([linear[0][:, None], budgets[0][0][:, None], *(t for t in pairs.values())])
    assert points.shape[1] > 255

    def dominated(i, allowed):
        return any(j != i and (points[j] <= points[i]).all() and ((points[j] < points[i]).any() or j < i)
                   for j in allowed)

    kept = _undominated(0, formats, linear, budgets, pairs, set())
    assert 4 not in kept and list(kept) == [i for i in formats if not dominated(i, formats)]
    dominators = [j for j in formats if j != 4 and (points[j] <= points[4]).all()]
    assert 4 in _undominated(0, formats, linear, budgets, pairs, set(dominators))  # every dominator excluded

"""uniform / uniform_within / layer_mix: targets are met exactly as solvers count them, blocks in order."""

from __future__ import annotations

import numpy as np
import pytest
from test_baselines_common import llama_problem

from bitalloc.search import Budgets, InfeasibleBudget, Problem
from bitalloc.search.baselines import UnitInfo, block_order, layer_mix, uniform, uniform_within


def test_uniform_puts_every_unit_in_the_format_and_totals_match_a_direct_sum():
    problem, _ = llama_problem(n_blocks=4)
    a = uniform(problem, "int4_g128")
    assert set(a.formats.values()) == {"int4_g128"}
    f = list(problem.format_names).index("int4_g128")
    assert a.bytes == int(problem.bytes[:, f].sum())
    assert a.avg_bits == pytest.approx(8 * problem.bytes[:, f].sum() / problem.numel.sum())
    assert a.solver == "uniform"


def test_uniform_rejects_a_format_a_unit_does_not_allow():
    allowed = np.array([[True, True], [True, False]])
    problem = Problem(error=np.ones((2, 2)), bytes=np.ones((2, 2)), numel=[1, 1], unit_names=["a", "b"],
                      format_names=["x", "y"], allowed=allowed)
    with pytest.raises(ValueError, match="does not allow"):
        uniform(problem, "y")
    with pytest.raises(ValueError, match="unknown format"):
        uniform(problem, "z")


@pytest.mark.parametrize("target", [3.0, 4.2, 5.0, 5.9, 8.2])
def test_uniform_within_is_the_largest_uniform_point_under_the_target(target):
    problem, _ = llama_problem(n_blocks=2)
    a = uniform_within(problem, target)
    assert a.avg_bits <= target
    cap = Budgets(max_avg_bits=target).byte_cap(problem.total_numel)
    fitting = [int(problem.bytes[:, f].sum()) for f in range(problem.n_formats) if problem.bytes[:, f].sum() <= cap]
    assert a.bytes == max(fitting)


def test_uniform_within_too_small_a_target_says_the_smallest():
    problem, _ = llama_problem(n_blocks=2)
    with pytest.raises(InfeasibleBudget) as err:
        uniform_within(problem, 1.5)
    assert err.value.smallest == pytest.approx(uniform(problem, "int2_g128").avg_bits)


def test_block_order_alternates_inwards_from_both_ends():
    assert block_order(1) == [0]
    assert block_order(6) == [0, 5, 1, 4, 2, 3]
    assert block_order(7) == [0, 6, 1, 5, 2, 4, 3]
    assert sorted(block_order(30)) == list(range(30))


@pytest.mark.parametrize("target", [3.2, 3.5, 3.9, 4.6, 5.0])
def test_layer_mix_meets_the_target_and_adding_the_next_block_would_break_it(target):
    problem, infos = llama_problem(n_blocks=30)
    a = layer_mix(problem, infos, "int3_g128", "int5_g128", target)
    assert a.avg_bits <= target
    high = a.info["high_blocks"]
    k = len(high)
    order = block_order(30)
    assert sorted(high) == sorted(order[:k])  # a prefix of the stated order
    # every unit of a block shares its width; high blocks at int5, the rest at int3
    for name, fmt in a.formats.items():
        block = infos[name].block
        assert fmt == ("int5_g128" if block in high else "int3_g128")
    if k < 30:  # one more block (the next in order) would exceed the target
        nxt = order[k]
        extra = sum(int(problem.bytes[u, 4] - problem.bytes[u, 1]) for u, n in enumerate(problem.unit_names)
                    if infos[n].block == nxt)
        assert 8 * (a.bytes + extra) / problem.total_numel > target


def test_layer_mix_keeps_units_outside_blocks_high_and_reports_infeasible_targets():
    problem, infos = llama_problem(n_blocks=8, lm_head=(4096, 576))
    a = layer_mix(problem, infos, "int2_g128", "int8_g128", 3.0)
    assert a.formats["lm_head"] == "int8_g128"
    assert a.avg_bits <= 3.0
    with pytest.raises(InfeasibleBudget):
        layer_mix(problem, infos, "int2_g128", "int8_g128", 2.2)
    # every block high when the target allows it
    full = layer_mix(problem, infos, "int2_g128", "int8_g128", 9.0)
    assert set(full.formats.values()) == {"int8_g128"}


def test_layer_mix_needs_infos_for_every_unit_and_low_below_high():
    problem, infos = llama_problem(n_blocks=2)
    partial = dict(list(infos.items())[1:])
    with pytest.raises(ValueError, match="no UnitInfo"):
        layer_mix(problem, partial, "int3_g128", "int5_g128", 4.0)
    with pytest.raises(ValueError, match="more bits"):
        layer_mix(problem, infos, "int5_g128", "int3_g128", 4.0)
    with pytest.raises(ValueError):
        UnitInfo(block=-1)


def test_fixed_units_keep_their_pinned_format_and_still_meet_the_target():
    base, infos = llama_problem(n_blocks=6)
    problem = Problem(error=base.error, bytes=base.bytes, numel=base.numel, unit_names=base.unit_names,
                      format_names=base.format_names, fixed={0: 5})  # block 0's q_proj pinned to int8
    assert uniform(problem, "int4_g128").formats[base.unit_names[0]] == "int8_g128"
    a = layer_mix(problem, infos, "int3_g128", "int5_g128", 4.0)
    assert a.formats[base.unit_names[0]] == "int8_g128" and a.avg_bits <= 4.0

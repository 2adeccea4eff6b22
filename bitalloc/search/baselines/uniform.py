"""One width everywhere, and two widths mixed by whole blocks.

``uniform`` is what a user gets by picking one format. ``layer_mix`` is the common manual
recipe for an average between two widths: keep whole blocks at the higher width, first
and last blocks first, alternating inwards (block order ``0, n-1, 1, n-2, 2, ...``). The
ends-first preference is the practitioners' rule that llama.cpp also encodes in its
``use_more_bits`` (the first and last eighth of the blocks get more bits); alternating
inwards extends it to any target. The longest prefix of that order whose average stays
within the target is taken; units outside blocks (``lm_head``) stay at the higher width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bitalloc.search.allocation import Allocation
from bitalloc.search.baselines.common import byte_cap, check_allowed, format_bits, format_index, pin_fixed, total_bytes
from bitalloc.search.baselines.info import UnitInfo, infos_for
from bitalloc.search.errors import InfeasibleBudget
from bitalloc.search.problem import Problem


def uniform(problem: Problem, format: str | int) -> Allocation:  # noqa: A002 - the vocabulary's word
    """Every unit in ``format`` (fixed units keep their pinned format)."""
    f = format_index(problem, format)
    choice = pin_fixed(problem, np.full(problem.n_units, f))
    check_allowed(problem, choice, "uniform")
    name = problem.format_names[f]
    return Allocation.of(problem, choice, solver="uniform", info={"baseline": "uniform", "format": name})


def uniform_within(problem: Problem, target_avg_bits: float, formats: Sequence[str | int] | None = None) -> Allocation:
    """The uniform allocation with the most bits within ``target_avg_bits``.

    Among ``formats`` (default: every format all units allow); raises
    :class:`InfeasibleBudget` when even the smallest exceeds the target.
    """
    indices = [format_index(problem, f) for f in formats] if formats is not None else \
        [f for f in range(problem.n_formats) if problem.allowed[:, f].all()]
    cap = byte_cap(problem, target_avg_bits)
    options = [uniform(problem, f) for f in indices]
    within = [a for a in options if a.bytes <= cap]
    if not within:
        raise InfeasibleBudget("max_avg_bits", target_avg_bits, min(a.avg_bits for a in options))
    best = max(within, key=lambda a: (a.bytes, -a.error))
    return Allocation.of(problem, best.choice, solver="uniform",
                         info={**best.info, "target_avg_bits": target_avg_bits})


def block_order(n_blocks: int) -> list[int]:
    """Blocks in the order they receive the higher width: ``0, n-1, 1, n-2, ...``."""
    order = []
    lo, hi = 0, n_blocks - 1
    while lo <= hi:
        order.append(lo)
        if hi != lo:
            order.append(hi)
        lo, hi = lo + 1, hi - 1
    return order


def layer_mix(problem: Problem, infos: Mapping[str, UnitInfo], low: str | int, high: str | int,
              target_avg_bits: float, n_blocks: int | None = None) -> Allocation:
    """Two widths by whole blocks, at most ``target_avg_bits`` on average.

    Blocks take ``high`` in :func:`block_order` while the average stays within the
    target; every other block is ``low``; units outside blocks are ``high``. ``n_blocks``
    defaults to the largest block index plus one. Raises :class:`InfeasibleBudget` when
    even every block at ``low`` exceeds the target.
    """
    lo_f, hi_f = format_index(problem, low, "low"), format_index(problem, high, "high")
    if format_bits(problem)[lo_f] > format_bits(problem)[hi_f]:
        raise ValueError(f"low format {problem.format_names[lo_f]} has more bits than high {problem.format_names[hi_f]}")
    blocks = np.array([-1 if i.block is None else i.block for i in infos_for(problem, infos)])
    n_blocks = int(blocks.max()) + 1 if n_blocks is None else n_blocks
    if blocks.max() >= n_blocks:
        raise ValueError(f"n_blocks={n_blocks} but a unit sits in block {int(blocks.max())}")
    order = block_order(n_blocks)
    cap = byte_cap(problem, target_avg_bits)

    def choice_for(k: int) -> np.ndarray:
        high_blocks = (blocks < 0) | np.isin(blocks, order[:k])
        return pin_fixed(problem, np.where(high_blocks, hi_f, lo_f))

    floor = choice_for(0)
    check_allowed(problem, floor, "layer_mix")
    check_allowed(problem, choice_for(n_blocks), "layer_mix")
    if total_bytes(problem, floor) > cap:
        raise InfeasibleBudget("max_avg_bits", target_avg_bits, Allocation.of(problem, floor).avg_bits)
    k = 0
    while k < n_blocks and total_bytes(problem, choice_for(k + 1)) <= cap:
        k += 1
    info = {"baseline": "layer_mix", "low": problem.format_names[lo_f], "high": problem.format_names[hi_f],
            "target_avg_bits": target_avg_bits, "high_blocks": sorted(order[:k]),
            "rule": "whole blocks at the high width, ends first alternating inwards (0, n-1, 1, n-2, ...); "
                    "units outside blocks at high"}
    return Allocation.of(problem, choice_for(k), solver="layer_mix", info=info)

"""NNCF's weight-compression mixed precision: which layers keep the backup (higher) width.

A port of ``MixedPrecisionCriterion.apply`` (openvinotoolkit/nncf,
``nncf/quantization/algorithms/weight_compression/mixed_precision.py``) and of
``WeightCompression._get_ratio_defining_params`` (``algorithm.py``):

* The ratio-defining layers are the MatMul weights, without the embeddings and without the
  last MatMul (``lm_head``, unless its weight is shared with the embedding), unless
  ``all_layers``. Everything else stays at the backup precision (INT8_ASYM by default).
  Here: units of kind ``token_embd`` or ``output`` keep ``high`` unless ``all_layers``;
  fixed units are left as pinned, outside the ratio (as NNCF's ignored scope is).
* Layers are sorted by ascending sensitivity score (a stable sort, ties in unit order) and
  take the primary (lower) precision one by one while
  ``(params_in_primary + params_of_layer) / params_of_ratio_defining_layers < ratio``;
  at the first layer that would reach the ratio it stops. ``ratio`` counts parameters.
  ``ratio == 1`` puts every ratio-defining layer in the primary precision.

The scores come from ``quant.sensitivity`` (weights and activations). From a target
average bits, the ratio is the one whose NNCF assignment is the nearest to the target from
below: the fewest layers at the primary width whose average bits stay within the target.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from bitalloc.search.allocation import Allocation
from bitalloc.search.baselines.common import (
    by_name,
    byte_cap,
    check_allowed,
    format_bits,
    format_index,
    pin_fixed,
    total_bytes,
)
from bitalloc.search.baselines.info import UnitInfo, infos_for
from bitalloc.search.errors import InfeasibleBudget
from bitalloc.search.problem import Problem

KEPT_KINDS = ("token_embd", "output")


def ratio_defining(problem: Problem, infos: Mapping[str, UnitInfo], all_layers: bool = False) -> np.ndarray:
    """Mask of the units whose parameters the ratio counts."""
    kinds = [i.kind for i in infos_for(problem, infos)]
    mask = np.array([all_layers or k not in KEPT_KINDS for k in kinds], dtype=bool)
    mask[list(problem.fixed)] = False
    return mask


def primary_prefix(scores: np.ndarray, numel: np.ndarray, ratio: float) -> list[int]:
    """NNCF's loop: positions (into ``scores``) that take the primary precision at ``ratio``."""
    if not 0 <= ratio <= 1:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if ratio == 1:
        return list(range(len(scores)))
    total = int(numel.sum())
    order = [i for i, _ in sorted(enumerate(scores), key=lambda x: x[1])]
    chosen, in_primary = [], 0
    for i in order:
        if (in_primary + int(numel[i])) / total >= ratio:
            break
        chosen.append(i)
        in_primary += int(numel[i])
    return chosen


def nncf_ratio(problem: Problem, infos: Mapping[str, UnitInfo], scores: Mapping[str, float] | Sequence[float],
               low: str | int, high: str | int, *, ratio: float | None = None,
               target_avg_bits: float | None = None, all_layers: bool = False,
               criterion: str | None = None) -> Allocation:
    """NNCF's assignment: ``low`` (primary) for the least sensitive layers up to ``ratio``.

    Give exactly one of ``ratio`` (NNCF's own parameter: the share of ratio-defining
    parameters in the primary precision, strictly below it unless 1) or
    ``target_avg_bits``. ``scores`` are per unit (by name or in unit order);
    ``criterion`` names the sensitivity metric they come from, for the record.
    """
    if (ratio is None) == (target_avg_bits is None):
        raise ValueError("nncf_ratio: give exactly one of ratio and target_avg_bits")
    lo_f, hi_f = format_index(problem, low, "low"), format_index(problem, high, "high")
    if format_bits(problem)[lo_f] > format_bits(problem)[hi_f]:
        raise ValueError(f"low format {problem.format_names[lo_f]} has more bits than high {problem.format_names[hi_f]}")
    values = by_name(scores, problem, "scores")
    defining = np.flatnonzero(ratio_defining(problem, infos, all_layers))
    numel = problem.numel[defining]
    total = int(numel.sum())

    def choice_for(positions: Sequence[int]) -> np.ndarray:
        choice = np.full(problem.n_units, hi_f)
        choice[defining[list(positions)]] = lo_f
        return pin_fixed(problem, choice)

    order = [i for i, _ in sorted(enumerate(values[defining]), key=lambda x: x[1])]
    if ratio is None:
        cap = byte_cap(problem, target_avg_bits)
        counts = range(len(order) + 1)
        k = next((k for k in counts if total_bytes(problem, choice_for(order[:k])) <= cap), None)
        if k is None:
            raise InfeasibleBudget("max_avg_bits", target_avg_bits,
                                   Allocation.of(problem, choice_for(order)).avg_bits)
        # The ratio NNCF needs to stop right after these k layers (1 when all of them).
        ratio = 1.0 if k == len(order) else (int(numel[order[:k]].sum()) + int(numel[order[k]])) / total
    positions = primary_prefix(values[defining], numel, ratio)
    choice = choice_for(positions)
    check_allowed(problem, choice, "nncf_ratio")
    info = {"baseline": "nncf", "criterion": criterion, "ratio": ratio, "all_layers": all_layers,
            "low": problem.format_names[lo_f], "high": problem.format_names[hi_f],
            "low_share": int(numel[positions].sum()) / total if total else 0.0,
            "kept_high": [problem.unit_names[u] for u in range(problem.n_units)
                          if u not in set(defining) and u not in problem.fixed],
            "target_avg_bits": target_avg_bits,
            "source": "nncf weight_compression/mixed_precision.py MixedPrecisionCriterion.apply"}
    return Allocation.of(problem, choice, solver="nncf", info=info)

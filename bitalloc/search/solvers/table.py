"""The DP table of a multiple-choice knapsack over a discretised resource.

One table holds, for every budget at once, the least total value reachable
within it, so a single build answers a solve at any budget up to its width.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

_HUGE = np.iinfo(np.int64).max


@dataclass(frozen=True, eq=False)
class KnapsackTable:
    """``best[m]``: the least total value over allocations whose bucketed
    resource is at most ``m`` buckets above the cheapest allocation.

    Bucketing: group g's option f costs ``ceil((R[g,f] - Rmin[g]) / step)``
    buckets, rounding up, so a bucket total within a cap's buckets means a
    true resource within the cap. ``slack`` bounds what rounding up can add
    to any allocation: ``sum_g max_f (step * buckets[g,f] - (R[g,f] - Rmin[g]))``
    (less than ``groups * step``; 0 when ``step`` divides every difference).

    Backtracking: ``rows[i][m]`` is the format of group ``order[i]`` in the
    best allocation of groups ``order[:i+1]`` within ``m`` buckets (a row
    ends where its groups' range does; beyond, its last entry holds).
    Groups left with one option are not DP steps; ``fixed`` holds their
    format.
    """

    step: int
    slack: int
    base: int
    best: np.ndarray
    order: np.ndarray
    rows: tuple[np.ndarray, ...]
    cost: np.ndarray
    fixed: np.ndarray

    @classmethod
    def build(cls, resource: np.ndarray, value: np.ndarray, allowed: np.ndarray, buckets: int, cap: int | None = None) -> KnapsackTable:
        """Tabulate budgets up to ``cap`` (all when None) in at most about
        ``buckets`` columns, from integer tables [G, F].

        ``step`` is the smallest multiple of the greatest common divisor of
        the option differences that fits the range in ``buckets`` columns, so
        regular sizes (real layer shapes) are often tabulated exactly. Options
        another option of the same group matches or beats on both resource and
        value are dropped first: no optimum needs them.
        """
        keep = _undominated(resource, value, allowed)
        base = np.where(keep, resource, _HUGE).min(axis=1)
        extra = np.where(keep, resource - base[:, None], 0)
        span = int(extra.max(axis=1).sum())
        reach = span if cap is None else min(span, cap - int(base.sum()))
        if reach < 0:
            empty = np.empty(0, np.int64)
            return cls(1, 0, int(base.sum()), empty, empty, (), np.zeros(resource.shape, np.int64), empty)
        granularity = int(np.gcd.reduce(extra[keep])) or 1
        step = granularity * -(-max(1, -(-reach // buckets)) // granularity)
        cost = -(-extra // step)
        slack = int((cost * step - extra).max(axis=1).sum())
        limit = None if cap is None else (cap - int(base.sum())) // step

        # Groups left with one option after bucketing are constants, not DP steps;
        # the rest go smallest range first, so early rows stay narrow.
        keep = _undominated(cost, value, keep)
        fixed = np.where(keep, cost, _HUGE).argmin(axis=1)
        free = np.flatnonzero(keep.sum(axis=1) > 1)
        order = free[np.argsort(cost[free].max(axis=1), kind="stable")]
        dtype = np.uint8 if resource.shape[1] <= 256 else np.uint16
        rows_all = np.arange(len(fixed))
        best = np.array([value[rows_all, fixed].sum() - value[order, fixed[order]].sum()], dtype=np.int64)
        rows = []
        for g in order:
            f = np.flatnonzero(keep[g])
            f = f[np.argsort(cost[g, f], kind="stable")]
            best, row = _add_group(best, cost[g, f], value[g, f], f.astype(dtype), limit)
            rows.append(row)
        return cls(step, slack, int(base.sum()), best, order, tuple(rows), cost, fixed)

    def within(self, resource_cap: int) -> np.ndarray | None:
        """Group choice with the least value whose bucketed resource fits
        ``resource_cap`` (None if even the cheapest does not)."""
        if resource_cap < self.base or not len(self.best):
            return None
        return self._backtrack(min((resource_cap - self.base) // self.step, len(self.best) - 1))

    def least_with(self, value_cap: int) -> np.ndarray | None:
        """Group choice with the fewest buckets whose value is within
        ``value_cap`` (None if none is)."""
        fits = self.best <= value_cap
        return self._backtrack(int(np.argmax(fits))) if fits.any() else None

    def _backtrack(self, m: int) -> np.ndarray:
        choice = self.fixed.copy()
        for g, row in zip(self.order[::-1], self.rows[::-1]):
            m = min(m, len(row) - 1)
            choice[g] = row[m]
            m -= int(self.cost[g, choice[g]])
        return choice


def _undominated(resource: np.ndarray, value: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """Per group (row), the allowed options no other option of the group
    matches or beats on both resource and value (one of equal ones kept)."""
    order = np.lexsort((value, resource, ~allowed), axis=1)
    sorted_value = np.take_along_axis(np.where(allowed, value, _HUGE), order, axis=1)
    cheaper_best = np.minimum.accumulate(sorted_value, axis=1)
    cheaper_best = np.concatenate([np.full((len(value), 1), _HUGE), cheaper_best[:, :-1]], axis=1)
    keep = np.zeros_like(allowed)
    np.put_along_axis(keep, order, np.take_along_axis(allowed, order, axis=1) & (sorted_value < cheaper_best), axis=1)
    return keep


def _add_group(best: np.ndarray, cost: np.ndarray, value: np.ndarray, formats: np.ndarray, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """One DP step: fold a group's options (cost[0] == 0) into ``best``.

    ``best`` is non-increasing and constant past its end, so it is extended
    with its last value; each option is one shifted, vectorised minimum.
    """
    width = len(best) - 1 + int(cost[-1])
    if limit is not None:
        width = min(width, limit)
    size = width + 1
    extended = np.concatenate([best, np.full(max(0, size - len(best)), best[-1])])[:size]
    new = extended + value[0]
    row = np.full(size, formats[0])
    for c, v, f in zip(cost[1:], value[1:], formats[1:]):
        if c >= size:
            break
        candidate = extended[: size - c] + v
        better = candidate < new[c:]
        np.copyto(new[c:], candidate, where=better)
        np.copyto(row[c:], f, where=better)
    return new, row



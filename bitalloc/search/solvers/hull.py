"""Convex-hull upgrade paths and the Lagrangian bound they give.

Each group's options are reduced to the lower convex hull of (resource,
value); its hull steps are upgrades with falling value per unit of resource.
Taking all groups' steps in order of that rate traces the Lagrangian (LP)
relaxation of the multiple-choice knapsack: every prefix is optimal for the
resource it uses exactly, and the rate of the step where a budget falls is
the optimal multiplier, whose bound lets ``dp`` discard options no better
allocation can use.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HullPath:
    """Upgrade steps of all groups, best rate first.

    ``start[g]`` is group g's cheapest hull option; step i moves group
    ``group[i]`` to format ``to[i]``, adding ``d_resource[i]`` (> 0) and
    ``d_value[i]`` (< 0); a group's steps come in its own hull order.
    """

    start: np.ndarray
    group: np.ndarray
    to: np.ndarray
    d_resource: np.ndarray
    d_value: np.ndarray
    start_resource: int
    start_value: int

    @classmethod
    def build(cls, resource: np.ndarray, value: np.ndarray, allowed: np.ndarray) -> HullPath:
        start, steps = [], []
        for g in range(len(resource)):
            hull = _lower_hull(resource[g], value[g], np.flatnonzero(allowed[g]))
            start.append(hull[0])
            for k, (a, b) in enumerate(zip(hull[:-1], hull[1:])):
                dr, dv = int(resource[g, b] - resource[g, a]), int(value[g, b] - value[g, a])
                steps.append((-dv / dr, g, k, b, dr, dv))
        steps.sort(key=lambda s: (-s[0], s[1], s[2]))
        _, group, _, to, d_resource, d_value = (list(c) for c in zip(*steps)) if steps else ([],) * 6
        rows = np.arange(len(start))
        return cls(
            start=np.array(start, dtype=np.int64),
            group=np.array(group, dtype=np.int64),
            to=np.array(to, dtype=np.int64),
            d_resource=np.array(d_resource, dtype=np.int64),
            d_value=np.array(d_value, dtype=np.int64),
            start_resource=int(resource[rows, start].sum()),
            start_value=int(value[rows, start].sum()),
        )

    def within(self, cap: int) -> np.ndarray:
        """Greedy: take steps in rate order while they fit ``cap``; a step
        that does not fit blocks its group's later steps (they build on it)."""
        choice = self.start.copy()
        blocked = np.zeros(len(choice), dtype=bool)
        total = self.start_resource
        for g, to, dr in zip(self.group.tolist(), self.to.tolist(), self.d_resource.tolist()):
            if blocked[g]:
                continue
            if total + dr <= cap:
                choice[g] = to
                total += dr
            else:
                blocked[g] = True
        return choice

    def steps_reaching(self, value_cap: int) -> int:
        """The fewest steps after which the total value is within ``value_cap``
        (all of them if none is)."""
        reached = self.start_value + np.concatenate([[0], np.cumsum(self.d_value)])
        within = reached <= value_cap
        return int(np.argmax(within)) if within.any() else len(self.group)

    def steps_within(self, cap: int) -> int:
        """The most leading steps whose total resource fits ``cap``."""
        used = self.start_resource + np.cumsum(self.d_resource)
        return int(np.searchsorted(used, cap, side="right"))

    def prefix(self, steps: int) -> np.ndarray:
        """The choice after the first ``steps`` steps."""
        choice = self.start.copy()
        last = dict(zip(self.group[:steps].tolist(), self.to[:steps].tolist()))
        choice[list(last)] = list(last.values())
        return choice

    def rate(self, step: int) -> float:
        """Value saved per unit of resource at a step (0 past the last)."""
        return -self.d_value[step] / self.d_resource[step] if step < len(self.group) else 0.0


def _lower_hull(resource: np.ndarray, value: np.ndarray, formats: np.ndarray) -> list[int]:
    """Formats on the lower-left convex hull of (resource, value), cheapest
    first, value strictly falling (Andrew's monotone chain)."""
    formats = formats[np.lexsort((value[formats], resource[formats]))]
    resource, value = resource.tolist(), value.tolist()  # Python ints: the cross product overflows int64
    hull: list[int] = []
    for f in formats.tolist():
        if hull and value[f] >= value[hull[-1]]:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (resource[b] - resource[a]) * (value[f] - value[a]) - (value[b] - value[a]) * (resource[f] - resource[a])
            if cross > 0:
                break
            hull.pop()
        hull.append(f)
    return hull


def lagrangian_bound(cost: np.ndarray, limited: np.ndarray, allowed: np.ndarray, weight: float, cap: int) -> tuple[float, np.ndarray]:
    """A lower bound on ``sum cost`` over allocations with ``sum limited <= cap``,
    and each option's reduced cost.

    For any ``weight >= 0``, every such allocation has ``sum cost >= bound``
    with ``bound = sum_g min_f (cost + weight * limited) - weight * cap``, and
    one that uses option (g, f) has ``sum cost >= bound + reduced[g, f]`` (the
    option's excess over its group's minimum; inf where not allowed). The
    multiplier at the step of the hull path where the cap falls gives the
    best such bound, the LP relaxation's value.
    """
    penalised = np.where(allowed, cost + weight * limited.astype(np.float64), np.inf)
    least = penalised.min(axis=1, keepdims=True)
    return float(least.sum()) - weight * cap, penalised - least

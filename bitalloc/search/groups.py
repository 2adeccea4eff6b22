"""Super-units: tie groups and fixed units folded into independent choices.

Every solver works on groups, not units: a tie group (units a runtime fuses,
such as q/k/v) becomes one group whose options are the formats all its
members allow, with costs summed over members; a fixed unit's group allows
only its format; every other unit is a group of one. Groups are then
independent, which is what makes the problem a multiple-choice knapsack.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class Groups:
    """``members[g]`` are the unit indices of group g; ``allowed[g, f]`` says
    whether the whole group may take format f."""

    members: tuple[np.ndarray, ...]
    allowed: np.ndarray

    @property
    def count(self) -> int:
        return len(self.members)

    def sum(self, per_unit: np.ndarray) -> np.ndarray:
        """Per-group totals [G, F] of a per-unit table [U, F]."""
        return np.stack([per_unit[m].sum(axis=0) for m in self.members])

    def options(self, g: int) -> np.ndarray:
        """The format indices group g may take."""
        return np.flatnonzero(self.allowed[g])

    def expand(self, group_choice: np.ndarray, n_units: int) -> np.ndarray:
        """The per-unit format indices of a per-group choice."""
        choice = np.empty(n_units, dtype=np.int64)
        for members, f in zip(self.members, group_choice):
            choice[members] = f
        return choice

    def collapse(self, unit_choice: np.ndarray) -> np.ndarray:
        """The per-group choice of a per-unit one (which respects the ties)."""
        return np.array([unit_choice[m[0]] for m in self.members], dtype=np.int64)


def build_groups(
    allowed: np.ndarray,
    tie_groups: tuple[tuple[int, ...], ...],
    fixed: dict[int, int],
    unit_names: tuple[str, ...],
) -> Groups:
    """Merge overlapping tie groups (ties are transitive), then intersect the
    allowed formats of each group's members and apply fixed units.

    Raises ValueError naming ``tie_groups`` or ``fixed`` when a group is left
    with no format to take.
    """
    n_units = allowed.shape[0]
    parent = list(range(n_units))

    def root(u: int) -> int:
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        return u

    for tie in tie_groups:
        for u in tie[1:]:
            parent[root(u)] = root(tie[0])
    roots: dict[int, list[int]] = {}
    for u in range(n_units):
        roots.setdefault(root(u), []).append(u)

    members = tuple(np.array(m, dtype=np.int64) for m in roots.values())
    group_allowed = np.stack([allowed[m].all(axis=0) for m in members])
    for g, m in enumerate(members):
        names = ", ".join(unit_names[u] for u in m)
        if not group_allowed[g].any():
            raise ValueError(f"tie_groups: units {names} share no allowed format")
        pinned = {fixed[u] for u in m if u in fixed}
        if len(pinned) > 1:
            raise ValueError(f"fixed: tied units {names} are fixed to different formats")
        if pinned:
            (f,) = pinned
            if not group_allowed[g, f]:
                raise ValueError(f"fixed: format {f} is not allowed for every unit tied in {names}")
            group_allowed[g] = False
            group_allowed[g, f] = True
    return Groups(members=members, allowed=group_allowed)

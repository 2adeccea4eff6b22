"""The exact minimum of a pairwise model under the budgets and tie groups, by CP-SAT.

The model is a table per unit and per pair of units (``surrogate.model.Cells``). On the
problem's groups (a tie group is one choice) a unit's table adds to its group's, a pair inside
one group adds its diagonal to that group's table, and a pair across two groups adds to that
pair of groups' table. One Boolean ``x[g, f]`` per group and format, exactly one per group; one
Boolean ``y[g, h, f, f']`` per pair of groups and pair of formats, tied to the ``x`` by its
marginals (``sum_f' y[g, h, f, f'] = x[g, f]`` and the other way round), so ``y`` is exactly
the product ``x[g, f] * x[h, f']``: the linear model whose optimum is the pairwise model's.
Costs are scaled to integers over ``OBJECTIVE_RANGE`` (finer than ``search.scaling``'s 1e-9 would
only slow CP-SAT down: the model itself is a few per cent off), budgets are the problem's
integer caps as ``ilp`` keeps them, so ``optimal`` means optimal for the model up to that rounding.

A group's format that another beats or matches in every budget and in every one of its
tables (its own and each pair's, row by row) is dropped first: it is never needed (within a
trust region too, once the centre's own format is kept). Allocations already measured can be
excluded (one no-good cut each, and a format is dropped only for a dominator they do not use),
so the search's next round always measures something new: the model's best among what it has
not seen, rather than the end of the loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from ortools.sat.python import cp_model

from bitalloc.search.budgets import Budgets
from bitalloc.search.errors import SearchError
from bitalloc.search.problem import Problem
from bitalloc.search.solvers.surrogate.model import Cells

OBJECTIVE_RANGE = 2.0**30  # the model's whole range in integers: rounding moves a total by < terms / 2**31 of it


@dataclass(frozen=True)
class Solution:
    """The per-unit choice at the model's minimum, whether CP-SAT proved it, and its size."""

    choice: np.ndarray
    optimal: bool
    variables: int


def minimise(problem: Problem, budgets: Budgets, cells: Cells, *, around: np.ndarray | None = None,
             radius: int | None = None, exclude: Sequence[Sequence[int]] = (), time_limit: float = 60.0,
             workers: int = 1, seed: int = 0) -> Solution | None:
    """The per-unit choice minimising ``cells`` within ``budgets`` and the problem's structure;
    with ``around`` (a per-unit choice) and ``radius``, among those that change at most ``radius``
    groups from it: a trust region, since a fitted model is only good near what was measured;
    never one of ``exclude`` (per-unit choices). None when no allocation is left (CP-SAT proved it)."""
    groups = problem.groups
    group_of = np.empty(problem.n_units, dtype=np.int64)
    for g, members in enumerate(groups.members):
        group_of[members] = g
    linear = groups.sum(np.where(problem.allowed, cells.linear, 0.0))
    pair_tables: dict[tuple[int, int], np.ndarray] = {}
    for (u, v), table in zip(cells.pairs, cells.pair):
        g, h = group_of[u], group_of[v]
        if g == h:
            linear[g] += np.diag(table)
        elif g < h:
            pair_tables[(g, h)] = pair_tables.get((g, h), 0.0) + table
        else:
            pair_tables[(h, g)] = pair_tables.get((h, g), 0.0) + table.T
    caps = problem.integer_caps(budgets)
    budget_tables = [groups.sum(problem.integer(m)) for m in caps]
    centre = None if around is None or radius is None else groups.collapse(np.asarray(around))
    excluded = [groups.collapse(np.asarray(seen)) for seen in exclude]
    options = [_undominated(g, np.flatnonzero(groups.allowed[g]), linear, budget_tables, pair_tables,
                            {int(e[g]) for e in excluded}) for g in range(groups.count)]
    if centre is not None:  # moving off the centre costs distance, so its format is never dominated
        options = [fs if centre[g] in fs else np.sort(np.append(fs, centre[g])) for g, fs in enumerate(options)]

    costs = [linear[g, fs] - linear[g, fs].min() for g, fs in enumerate(options)]
    blocks = {(g, h): t[np.ix_(options[g], options[h])] for (g, h), t in pair_tables.items()}
    blocks = {key: block - block.min() for key, block in blocks.items()}
    magnitude = sum(float(c.max()) for c in costs) + sum(float(b.max()) for b in blocks.values())
    factor = OBJECTIVE_RANGE / magnitude if magnitude > 0 else 1.0

    model = cp_model.CpModel()
    x = [{f: model.new_bool_var(f"x{g}_{f}") for f in fs} for g, fs in enumerate(options)]
    for row in x:
        model.add_exactly_one(row.values())
    variables: list[cp_model.IntVar] = []
    weights: list[int] = []
    for g, fs in enumerate(options):
        variables += [x[g][f] for f in fs]
        weights += np.rint(costs[g] * factor).astype(np.int64).tolist()
    for (g, h), block in blocks.items():
        y = {(f, k): model.new_bool_var(f"y{g}_{h}_{f}_{k}") for f in options[g] for k in options[h]}
        for f in options[g]:
            model.add(sum(y[f, k] for k in options[h]) == x[g][f])
        for k in options[h]:
            model.add(sum(y[f, k] for f in options[g]) == x[h][k])
        variables += list(y.values())
        weights += np.rint(block * factor).astype(np.int64).ravel().tolist()
    for table, cap in zip(budget_tables, caps.values()):
        low = sum(int(table[g, fs].min()) for g, fs in enumerate(options))
        model.add(sum((int(table[g, f] - table[g, fs].min())) * x[g][f] for g, fs in enumerate(options) for f in fs)
                  <= cap - low)
    if centre is not None:
        model.add(sum(x[g][f] for g, f in enumerate(centre)) >= groups.count - radius)
    for seen in excluded:  # a choice with a dropped format cannot be chosen anyway
        if all(f in row for row, f in zip(x, seen)):
            model.add(sum(row[f] for row, f in zip(x, seen)) <= groups.count - 1)
    model.minimize(cp_model.LinearExpr.weighted_sum(variables, weights))

    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit
    solver.parameters.num_workers = workers
    solver.parameters.random_seed = seed
    solver.parameters.linearization_level = 2  # the marginals' LP relaxation is tight when interactions are weak
    status = solver.solve(model)
    if status == cp_model.INFEASIBLE:
        return None
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise SearchError(f"surrogate: CP-SAT found no allocation of the model within {time_limit}s "
                          f"({solver.status_name(status)})")
    group_choice = np.array([next(f for f, var in row.items() if solver.boolean_value(var)) for row in x])
    return Solution(groups.expand(group_choice, problem.n_units), status == cp_model.OPTIMAL, len(model.proto.variables))


def _undominated(g: int, formats: np.ndarray, linear: np.ndarray, budget_tables: list[np.ndarray],
                 pair_tables: dict[tuple[int, int], np.ndarray], excluded: set[int]) -> np.ndarray:
    """Group ``g``'s formats, less those some other format beats or matches (keeping the first of
    equals) in every budget, its own cost and every row of its pair tables.

    Swapping a dropped format for its dominator never makes an allocation worse, so the optimum
    never needs it, unless that swap lands on an excluded allocation. So a format is dropped
    only where a dominator that no excluded allocation uses in this group exists (``excluded``:
    the formats they use here)."""
    rows = [linear[g, formats][:, None], *(t[g, formats][:, None] for t in budget_tables)]
    rows += [t[formats] for (a, _), t in pair_tables.items() if a == g]
    rows += [t[:, formats].T for (_, b), t in pair_tables.items() if b == g]
    points = np.hstack(rows)
    below = (points[:, None, :] <= points[None, :, :]).all(axis=-1)  # below[j, i]: j matches or beats i everywhere
    order = np.arange(len(formats))
    beats = below & ((points[:, None, :] < points[None, :, :]).any(axis=-1) | (order[:, None] < order[None, :]))
    front = ~beats.any(axis=0)  # one per distinct point, the first; a pair table's columns can number thousands
    free = front & ~np.isin(formats, list(excluded))
    keep = front | ~(below & free[:, None]).any(axis=0)
    return formats[keep]

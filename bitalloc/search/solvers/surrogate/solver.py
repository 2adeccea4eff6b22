"""surrogate: a measured model of KL with pairwise terms, solved exactly, refitted as it learns.

The profile's sum ranks allocations well but its exact optimum sits where the sum underrates
the damage most (``bench/additivity.py``); descent's local model only sees one point. This
search learns the measured objective over a neighbourhood of the budget instead (AMQ's
fit-and-search loop with CLADO's pairwise terms):

1. sample allocations near the budget around the start and the seeds (``surrogate.sampler``)
   and measure each one window by window;
2. fit scales per format and kind plus pairwise terms between units of one block and of
   adjacent blocks (``surrogate.model``) on half of the windows, the *selection* half;
3. minimise the fitted model exactly under the budgets and tie groups (``surrogate.exact``),
   within a trust region (at most ``trust`` of the groups changed from the best allocation so
   far: a fitted model is only good near what was measured) and among the allocations not
   measured yet, measure that allocation, add it, refit; a round whose allocation is not lower
   than the best so far by the paired test over the selection windows is a miss, and
   ``patience`` misses in a row (or ``rounds`` rounds, or a trust region measured through) end
   the loop;
4. the best allocation by the selection windows replaces the start only if the paired test over
   the other half, the *confirmation* windows, says it is lower there too. The winner of many
   comparisons on the same windows is favoured by their noise; the confirmation windows never
   took part in choosing it. So the result is never worse than the start by the test.

Its cost is the measurements: ``initial + rounds`` at most, each one forward pass of the
quantized model over the fitness windows (and the quantization of any cells not cached yet);
fitting and solving take seconds.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping, Sequence

import numpy as np

from bitalloc.search.allocation import Allocation
from bitalloc.search.budgets import Budgets, Metric
from bitalloc.search.measure import Measure, p_lower, windows
from bitalloc.search.problem import Problem
from bitalloc.search.registry import register
from bitalloc.search.solver import Solver
from bitalloc.search.solvers.refine import starting_point
from bitalloc.search.solvers.surrogate.exact import minimise
from bitalloc.search.solvers.surrogate.layout import Layout
from bitalloc.search.solvers.surrogate.model import InteractionModel, held_out
from bitalloc.search.solvers.surrogate.sampler import Sampler


@register
class SurrogateSolver(Solver):
    """Fit-and-solve search by a measured objective, from ``start`` (the exact solver's optimum of
    the proxy when None).

    ``measure(allocation, samples)`` gives one value per window (lower is better; at least two
    windows, to select on one half and confirm on the other); ``seeds`` are other allocations to
    sample around (e.g. HAWQ-V3's; those outside the budgets are left out); ``blocks`` gives each
    unit's block (None outside blocks), which enables the pairwise terms; ``initial`` allocations
    are sampled and measured before the first fit; at most ``rounds`` solve-and-measure rounds
    follow, each solving within ``trust`` of the groups (a fraction) of the best allocation so far;
    ``confidence`` is the paired tests' level (None compares means). ``measured`` maps per-unit
    choices to the window values this measure gave them before (another budget's search of the
    same problem and windows, say): they are fitted on and never measured again, and the search
    adds what it measures to it. ``proxies`` are other per-unit error tables of the problem
    (another metric's cells) the model may weigh in beside the problem's own.
    """

    name = "surrogate"

    def __init__(self, measure: Measure, *, samples: int, start: Allocation | None = None,
                 seeds: Sequence[Allocation] = (), blocks: Sequence[int | None] | None = None, initial: int = 24,
                 rounds: int = 8, patience: int = 2, trust: float = 0.1, confidence: float | None = 0.95,
                 time_limit: float = 60.0, seed: int = 0,
                 measured: MutableMapping[tuple[int, ...], np.ndarray] | None = None,
                 proxies: Sequence[np.ndarray] = ()) -> None:
        if samples < 1 or initial < 2 or rounds < 0 or patience < 1:
            raise ValueError(f"samples >= 1, initial >= 2, rounds >= 0 and patience >= 1 are needed, got "
                             f"{samples}, {initial}, {rounds} and {patience}")
        if not 0 < trust <= 1:
            raise ValueError(f"trust must be a fraction of the groups in (0, 1], got {trust}")
        if confidence is not None and not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        self.measure, self.samples, self.start, self.seeds, self.blocks = measure, samples, start, tuple(seeds), blocks
        self.initial, self.rounds, self.patience, self.confidence = initial, rounds, patience, confidence
        self.trust, self.time_limit, self.seed = trust, time_limit, seed
        self.measured = {} if measured is None else measured
        self.proxies = tuple(proxies)

    def _solve(self, problem: Problem, budgets: Budgets, objective: Metric) -> Allocation:
        return _Search(self, problem, budgets, starting_point(problem, budgets, objective, self.start)).run()


class _Search:
    """One run: the measured allocations (per unit, with their windows) and the loop."""

    def __init__(self, solver: SurrogateSolver, problem: Problem, budgets: Budgets, start: Allocation) -> None:
        self.solver, self.problem, self.budgets, self.start = solver, problem, budgets, start
        self.layout = Layout.of(problem.unit_names, solver.blocks)
        self.measured = solver.measured
        self.before = len(self.measured)
        self.seconds = {"measure": 0.0, "fit": 0.0, "solve": 0.0}

    def measure(self, choice: Sequence[int]) -> np.ndarray:
        key = tuple(int(f) for f in choice)
        if key not in self.measured:
            clock = time.perf_counter()
            values = windows(self.solver.measure, Allocation.of(self.problem, key), self.solver.samples)
            if len(values) < 2:
                raise ValueError("surrogate: the measure must give at least two windows, to select on one half "
                                 "and confirm on the other")
            self.measured[key] = values
            self.seconds["measure"] += time.perf_counter() - clock
        return self.measured[key]

    def selection(self, choice: Sequence[int]) -> np.ndarray:
        return self.measure(choice)[0::2]

    def confirmation(self, choice: Sequence[int]) -> np.ndarray:
        return self.measure(choice)[1::2]

    def fit(self) -> InteractionModel:
        clock = time.perf_counter()
        choices = np.array(list(self.measured))
        model = InteractionModel(self.problem.error, self.layout, proxies=self.solver.proxies)
        model.fit(choices, [self.selection(c).mean() for c in choices])
        self.seconds["fit"] += time.perf_counter() - clock
        return model

    def run(self) -> Allocation:
        solver, problem = self.solver, self.problem
        seeds = [s for s in solver.seeds if not problem.violations(s.choice, self.budgets)]
        groups = problem.groups
        centres = [groups.collapse(np.array(a.choice)) for a in (self.start, *seeds)]
        for choice in Sampler(problem, self.budgets, seed=solver.seed).sample(centres, solver.initial):
            self.measure(groups.expand(choice, problem.n_units))
        best, misses, history = self.start.choice, 0, []
        radius = max(1, round(solver.trust * groups.count))
        for _ in range(solver.rounds if len(self.measured) >= 2 else 0):
            model = self.fit()
            clock = time.perf_counter()
            solution = minimise(problem, self.budgets, model.cells(), around=np.array(best), radius=radius,
                                exclude=self.within(), time_limit=solver.time_limit, seed=solver.seed)
            self.seconds["solve"] += time.perf_counter() - clock
            if solution is None:  # everything within the trust region has been measured
                break
            choice = tuple(int(f) for f in solution.choice)
            p = p_lower(self.selection(best), self.selection(choice), solver.confidence)
            history.append({"predicted": float(model.predict(np.array([choice]))[0]),
                            "measured": float(self.selection(choice).mean()), "p_value": p,
                            "optimal": solution.optimal, "variables": solution.variables})
            if p <= self.threshold:
                best, misses = choice, 0
            else:
                misses += 1
                if misses >= solver.patience:
                    break
        return self.result(history)

    def within(self) -> list[tuple[int, ...]]:
        """The measured allocations that meet this search's budgets."""
        return [c for c in self.measured if not self.problem.violations(c, self.budgets)]

    @property
    def threshold(self) -> float:
        return 0.0 if self.solver.confidence is None else 1.0 - self.solver.confidence

    def result(self, history: list[dict]) -> Allocation:
        """The best by the selection windows if the confirmation windows agree, else the start."""
        problem, start = self.problem, self.start.choice
        best = min(self.within(), key=lambda c: self.selection(c).mean())
        confirm_p = p_lower(self.confirmation(start), self.confirmation(best), self.solver.confidence)
        chosen = best if confirm_p <= self.threshold else start
        info = {"start_measured": float(self.measure(start).mean()), "samples": self.solver.samples,
                "evaluations": len(self.measured) - self.before, "reused": self.before, "rounds": history,
                "selected_measured": float(self.measure(best).mean()), "confirm_p_value": confirm_p,
                "confirmed": chosen == best and best != start}
        if len(self.measured) >= 2:
            info |= self.diagnostics()
        info["seconds"] = {k: round(v, 2) for k, v in self.seconds.items()}
        return Allocation.of(problem, chosen, solver="surrogate", info=info).with_measured(float(self.measure(chosen).mean()))

    def diagnostics(self) -> dict:
        """The final model's fitted corrections, and its prediction of allocations held out of the fit."""
        problem, choices = self.problem, np.array(list(self.measured))
        fit = held_out(problem.error, self.layout, choices, [self.selection(c).mean() for c in choices],
                       seed=self.solver.seed, proxies=self.solver.proxies)
        model = self.fit()
        weights = model.weights()
        weights["format"] = {problem.format_names[f]: w for f, w in weights["format"].items()}
        weights["proxies"] = [{problem.format_names[f]: w for f, w in delta.items()} for delta in weights["proxies"]]
        return {"held_out": fit, "model": {"scale": float(model.scale), "penalty": model.penalty, "weights": weights}}

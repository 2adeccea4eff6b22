"""optuna: an Optuna study over the per-group formats, by the proxy or by a measure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
import optuna

from bitalloc.search.allocation import Allocation
from bitalloc.search.budgets import Budgets, Metric
from bitalloc.search.errors import SearchError
from bitalloc.search.front import Front
from bitalloc.search.measure import Measure, mean
from bitalloc.search.problem import Problem
from bitalloc.search.registry import get_solver, register
from bitalloc.search.solver import Solver
from bitalloc.search.solvers.knapsack import exact_solver_name


@register
class OptunaSolver(Solver):
    """Black-box search with Optuna (TPE or NSGA-II sampler).

    Each group with a choice is one categorical parameter named after its
    first unit, valued by format name, so a study reads naturally in
    Optuna's dashboard. Budgets are Optuna constraints
    (``Trial.set_constraint``, which both samplers honour). With a
    ``measure``, the error objective is *measured* (the mean over its windows
    at a fixed ``samples``) on each allocation that meets the budgets (e.g.
    the model's real KL) instead of predicted, and
    results carry it in ``measured``; allocations outside the budgets are
    ranked by predicted error and never measured.

    :meth:`solve` first enqueues the exact solver's answer (``dp``, or
    ``ilp`` for several budgets), so the study starts from the proxy's
    optimum and can only improve on it by the objective it optimises.
    ``storage`` (an Optuna storage URL such as the service's database URL,
    or a storage object) and ``study_name`` make a study durable and
    resumable; ``n_trials`` more trials run on each call.
    """

    name = "optuna"

    def __init__(
        self,
        n_trials: int = 200,
        timeout: float | None = None,
        sampler: Literal["tpe", "nsga2"] = "tpe",
        measure: Measure | None = None,
        samples: int = 2048,
        storage: str | optuna.storages.BaseStorage | None = None,
        study_name: str | None = None,
        seed: int = 0,
    ) -> None:
        if sampler not in ("tpe", "nsga2"):
            raise ValueError(f"sampler must be 'tpe' or 'nsga2', got {sampler!r}")
        self.n_trials = n_trials
        self.timeout = timeout
        self.sampler = sampler
        self.measure, self.samples = measure, samples
        self.storage = storage
        self.study_name = study_name
        self.seed = seed

    def _solve(self, problem: Problem, budgets: Budgets, objective: Metric) -> Allocation:
        exact = get_solver(exact_solver_name(problem, budgets, objective))
        found = self._study(problem, (objective,), budgets, start=[exact.solve(problem, budgets, objective)])
        return min(found, key=lambda a: self._score(a, objective))

    def _front(self, problem: Problem, axes: tuple[Metric, ...], points: int, budgets: Budgets) -> Front:
        found = self._study(problem, axes, budgets, start=[])
        measured_axes = tuple("measured" if self.measure and m == "error" else m for m in axes)
        return Front.of(found, measured_axes)

    def _score(self, allocation: Allocation, metric: Metric) -> float:
        return allocation.measured if self.measure and metric == "error" else allocation.value(metric)

    def _study(self, problem: Problem, axes: Sequence[Metric], budgets: Budgets, start: list[Allocation]) -> list[Allocation]:
        """Run the study; the allocations of its trials within the budgets."""
        groups = problem.groups
        caps = problem.integer_caps(budgets)
        free = [g for g in range(groups.count) if len(groups.options(g)) > 1]
        names = {g: problem.unit_names[groups.members[g][0]] for g in free}
        choices = {g: [problem.format_names[f] for f in groups.options(g)] for g in free}
        fmt_index = {name: f for f, name in enumerate(problem.format_names)}
        default = np.array([groups.options(g)[0] for g in range(groups.count)])

        def allocation_of(params: dict[str, str]) -> Allocation:
            choice = default.copy()
            for g in free:
                choice[g] = fmt_index[params[names[g]]]
            return Allocation.of(problem, groups.expand(choice, problem.n_units), solver=self.name)

        def objective(trial: optuna.Trial) -> tuple[float, ...]:
            allocation = allocation_of({names[g]: trial.suggest_categorical(names[g], choices[g]) for g in free})
            feasible = True
            for m, cap in caps.items():
                excess = problem.integer_total(allocation.choice, m) - cap
                trial.set_constraint(f"max_{m}", excess / max(abs(cap), 1))
                feasible &= excess <= 0
            values = []
            for m in axes:
                if m == "error" and self.measure is not None and feasible:
                    value = mean(self.measure, allocation, self.samples)
                    trial.set_user_attr("measured", value)
                    values.append(value)
                else:
                    values.append(float(allocation.value(m)))
            return tuple(values)

        sampler: optuna.samplers.BaseSampler
        if self.sampler == "tpe":
            sampler = optuna.samplers.TPESampler(seed=self.seed, multivariate=True)
        else:
            sampler = optuna.samplers.NSGAIISampler(seed=self.seed)
        study = optuna.create_study(
            storage=self.storage, study_name=self.study_name, load_if_exists=self.study_name is not None,
            sampler=sampler, directions=["minimize"] * len(axes),
        )
        for allocation in start:
            study.enqueue_trial({names[g]: problem.format_names[allocation.choice[groups.members[g][0]]] for g in free})
        study.optimize(objective, n_trials=self.n_trials, timeout=self.timeout)

        # A resumed study may hold trials run under other budgets or without
        # the measure: check each against this call's budgets and needs.
        needs_measure = self.measure is not None and "error" in axes
        found = []
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
            if set(trial.params) != set(names.values()) or (needs_measure and "measured" not in trial.user_attrs):
                continue
            allocation = allocation_of(trial.params)
            if not problem.violations(allocation.choice, budgets):
                found.append(allocation.with_measured(trial.user_attrs["measured"]) if needs_measure else allocation)
        if not found:
            raise SearchError(f"solver 'optuna' found no allocation within the budgets in {len(study.trials)} trials; solver='ilp' decides whether one exists")
        return found

"""The steps that choose a job's point, behind one interface, composed by ``recipe``.

A ``Step`` takes the point so far (``None`` before the first step) and returns the next one.
The first step picks the point at the budget: ``Solve`` (the exact optimum of the profile's
predicted error), ``Baseline`` (a named published rule), or ``Target`` (the smallest
allocation whose *measured* KL meets the accuracy target). Measured improvement follows:
``Descend`` (proximal steps on the KL's local model), ``Surrogate`` (a fitted model of KL with
pairwise terms, solved exactly), then ``Refine`` (EvoPress-style evolution), each within its
start's own size and never kept unless it measures better.

Each step carries its own parameters (the target KL, the iterations, the generations), as
llm-compressor's modifiers do, so the benches compose the very steps a job runs. What steps
share (the model, the calibration windows, the problem, GPTQ's Hessians, the fitness measure)
lives once in a ``Workspace``, computed on first use.
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from bitalloc.pipeline.baselines import BaselineRequest, named_baseline
from bitalloc.pipeline.measured import MeasuredAllocations
from bitalloc.pipeline.problem import problem_of
from bitalloc.pipeline.spec import KL_METRICS, JobSpec
from bitalloc.quant.calibration import CalibrationSet, calibration_tokens
from bitalloc.quant.evaluate import Evaluator, MeasuredKL
from bitalloc.quant.formats import parse_formats
from bitalloc.quant.hessian import BlockHessians, Hessians, calibration_hessians
from bitalloc.quant.linearize import KLGradient
from bitalloc.quant.loading import LoadedModel
from bitalloc.quant.profile import ProfileCache
from bitalloc.quant.sensitivity import nncf_scores, streamed_nncf_scores
from bitalloc.quant.simulation import QuantizedWeights
from bitalloc.quant.stream import StreamedModel
from bitalloc.quant.units import UnitSet
from bitalloc.search import Allocation, Budgets, Problem, get_solver, smallest_within, solve
from bitalloc.search.baselines import hawq_v3, rescore
from bitalloc.search.feasibility import extreme_allocation
from bitalloc.search.solvers.refine import staged_schedule


@dataclass
class Workspace:
    """What a job's steps share.

    Measured KL is taken on ``fitness_windows`` windows of ``spec.fitness_source`` (the job's
    calibration text at other random offsets than the profile's, or the reference tuning
    split): never on the evaluation text the result is judged on. Descent's gradients come
    from the first ``gradient_windows`` of the profile's own calibration windows, so the steps
    it proposes and the measurement that accepts them see different text.
    """

    spec: JobSpec
    model: LoadedModel
    units: UnitSet
    calibration: CalibrationSet
    problem: Problem
    profile_dir: Path
    notify: Callable[[str], None]
    notes: list[str] = field(default_factory=list)
    # The quantized cells measured search reuses from one candidate to the next (a caller that
    # scores allocations too, like bench.quality, passes its own to share them). By default 1 GB
    # of them, or a streamed model's share of its memory cap: beyond it, cells are recomputed.
    weights: QuantizedWeights | None = None
    # The options of HAWQ-V3's hessian_trace profile (its Hutchinson samples and windows).
    trace_options: dict | None = None
    # The profile's key: with it, the surrogate keeps what it measured beside the profile, for a
    # search at another budget (``pipeline.measured``); ``measured_path`` names that file once written.
    profile_key: str | None = None
    measured_path: Path | None = None

    def __post_init__(self) -> None:
        if self.weights is None:
            budget = self.model.state_budget if isinstance(self.model, StreamedModel) else None
            self.weights = QuantizedWeights(1e9 if budget is None else budget)

    def with_problem(self, problem: Problem) -> Workspace:
        """The same workspace posing another problem (the same profile without tie groups, say):
        what it has measured already (GPTQ's Hessians, the fitness windows) is shared, not
        measured again."""
        return self._twin(("hessians", "fitness"), problem=problem)

    def with_budgets(self, budgets: Budgets) -> Workspace:
        """The same workspace for a job with other budgets (a bench sweeping targets): everything
        it has measured is shared."""
        return self._twin(("hessians", "fitness", "trace_problem"), spec=replace(self.spec, budgets=budgets))

    def _twin(self, shared: tuple[str, ...], **changes: object) -> Workspace:
        """A copy with ``changes``, holding the ``shared`` cached properties this one has computed."""
        twin = replace(self, **changes)
        twin.__dict__.update({name: self.__dict__[name] for name in shared if name in self.__dict__})
        return twin

    def note(self, message: str) -> None:
        """Tell the user now (the CLI's stderr, the job's log) what they should know about the
        choice, such as a budget that does not bind, and keep it for the summary."""
        self.notes.append(message)
        self.notify(message)

    @functools.cached_property
    def hessians(self) -> Hessians | BlockHessians | None:
        """GPTQ's calibration Hessians, collected once for measurement and evaluation alike; for a
        model streamed block by block, summed block by block whenever it is scored."""
        if self.spec.method != "gptq":
            return None
        if isinstance(self.model, StreamedModel):
            return BlockHessians(self.units, self.calibration)
        return calibration_hessians(self.model.module, self.units, self.calibration)

    @functools.cached_property
    def trace_problem(self) -> Problem:
        """The problem of a ``hessian_trace`` profile of the same units and formats (HAWQ-V3's),
        tied as the job's problem is."""
        spec = self.spec
        profile, _ = ProfileCache(self.profile_dir).get_or_build(
            self.model, self.units, parse_formats(spec.formats), "hessian_trace", self.calibration,
            method=spec.method, kv=spec.kv, hardware=spec.hardware, options=self.trace_options)
        return problem_of(profile, ties=bool(self.problem.tie_groups))

    @functools.cached_property
    def fitness(self) -> MeasuredKL:
        if not self.model.is_causal_lm:
            raise ValueError("measured KL (descend, surrogate, refine, measured_kl budgets) needs a causal language model")
        spec = self.spec
        windows = calibration_tokens(self.model.tokenizer, spec.fitness_source, seq_len=spec.seq_len,
                                     count=spec.fitness_windows, seed=spec.seed + 1, bos=spec.bos)
        evaluator = Evaluator(self.model, windows)
        evaluator.weights = self.weights
        return MeasuredKL(evaluator, method=spec.method, hessians=self.hessians)

    @property
    def fitness_samples(self) -> int:
        return self.spec.fitness_windows * self.spec.seq_len

    def within(self, start: Allocation) -> Budgets:
        """The start's own size (and latency, where the job bounds it): what measured search keeps to."""
        bounded = self.spec.budgets.max_latency is not None
        return Budgets(max_bytes=start.bytes, max_latency=start.latency if bounded else None)


class Step(ABC):
    """One step of choosing the point: the point so far in, the next point out."""

    name: ClassVar[str]

    @abstractmethod
    def __call__(self, work: Workspace, point: Allocation | None) -> Allocation | None: ...


@dataclass
class Solve(Step):
    """The exact optimum of the predicted error within ``budgets`` (the fewest bytes for an error
    budget alone) by ``solver``; no point when no budget is given (only the front)."""

    budgets: Budgets
    solver: str = "dp"
    name = "solve"

    def __call__(self, work: Workspace, point: Allocation | None) -> Allocation | None:
        budgets = self.budgets
        if not budgets.given():
            return None
        best = extreme_allocation(work.problem, "error", "bytes")
        if budgets.objective() == "error" and not work.problem.violations(best.choice, budgets):
            work.note(f"the budget ({budgets.describe()}) does not bind: the most accurate allocation of "
                      f"these formats already fits at {best.avg_bits:.3f} average bits; give a tighter "
                      "budget or lower-bit formats to trade size for error")
        return solve(work.problem, budgets, solver=self.solver, objective=budgets.objective())


class Baseline(Step):
    """What a user would get without bitalloc, by a published rule, on the same profile."""

    name = "baseline"

    def __call__(self, work: Workspace, point: Allocation | None) -> Allocation:
        spec = work.spec
        request = BaselineRequest.parse(spec.baseline or "")
        unknown = sorted(set(request.formats()) - set(work.problem.format_names))
        if unknown:
            raise ValueError(f"baseline {spec.baseline!r} names formats {unknown} that are not among the job's formats")

        def scores() -> dict[str, float]:
            batches = work.calibration.batches(4)
            if isinstance(work.model, StreamedModel):
                return streamed_nncf_scores(work.model, work.units.weights, batches)
            return nncf_scores(work.model.module, work.units.weights, batches=batches)

        return named_baseline(request, work.problem, work.units.units, spec.budgets.max_avg_bits,
                              trace_problem=lambda: work.trace_problem, scores=scores)


@dataclass
class Target(Step):
    """The smallest allocation whose KL, measured on the fitness windows, meets ``kl`` (the
    job's ``measured_kl``) with 95 % confidence."""

    kl: float
    name = "target"

    def __call__(self, work: Workspace, point: Allocation | None) -> Allocation:
        return smallest_within(work.problem, self.kl, measure=work.fitness, samples=work.fitness_samples)


@dataclass
class Descend(Step):
    """Up to ``iterations`` proximal descent steps within the point's own size: each solves the
    KL's local model (its gradient at the current point) exactly and is kept only if it
    measures better."""

    iterations: int
    name = "descend"

    def __call__(self, work: Workspace, point: Allocation | None) -> Allocation | None:
        if point is None:
            return None
        spec = work.spec
        if spec.metric not in KL_METRICS:
            raise ValueError(f"descend: the steps weigh KL gradients against the profile's error, so the metric must "
                             f"be in KL units {KL_METRICS}, not {spec.metric!r}")
        fitness = work.fitness
        gradient = Evaluator(work.model, work.calibration.head(spec.gradient_windows), batch_size=2)
        gradient.weights = work.weights  # one cache of quantized cells for both
        problem = work.problem
        linear = KLGradient(gradient, problem.unit_names, problem.format_names, problem.allowed,
                            method=spec.method, hessians=work.hessians)
        solver = get_solver("descent", measure=fitness, linear=linear, start=point, samples=work.fitness_samples,
                            iterations=self.iterations)
        return solver.solve(problem, work.within(point))


@dataclass
class Surrogate(Step):
    """A measured model of KL with pairwise terms between units of nearby blocks, fitted to
    allocations sampled around the point and HAWQ-V3's (whose Hessian-trace cells the model may
    also weigh in), solved exactly within the job's size budget (the point's own size when the
    job sets none), refitted for up to ``rounds`` rounds; kept only if confirmed on windows it
    was not chosen on."""

    rounds: int
    initial: int = 24  # allocations measured before the first fit
    # The paired tests' level; None takes the lower mean (no guarantee against the start: for a
    # bench's oracle that selects on the very windows it is judged on, never for a job).
    confidence: float | None = 0.95
    patience: int = 2  # rounds in a row that find nothing lower before the search stops
    name = "surrogate"

    def __call__(self, work: Workspace, point: Allocation | None) -> Allocation | None:
        if point is None:
            return None
        problem, fitness, traces = work.problem, work.fitness, work.trace_problem
        within = work.within(point)
        asked = work.spec.budgets.byte_cap(problem.total_numel)
        if asked is not None and asked > within.max_bytes:
            # the job's size budget, not the start's few bytes below it: HAWQ-V3's point at the
            # budget, and any neighbour as small as the user asked for, are fair game
            within = replace(within, max_bytes=asked)
        seeds = [rescore(hawq_v3(traces, within), problem)]
        blocks = {unit.name: unit.block for unit in work.units.units}
        store = (None if work.profile_key is None
                 else MeasuredAllocations(work.profile_dir, work.profile_key, fitness.evaluator.windows.describe()))
        measured = {} if store is None else store.load(problem)
        solver = get_solver("surrogate", measure=fitness, samples=work.fitness_samples, start=point, seeds=seeds,
                            blocks=[blocks[name] for name in problem.unit_names], rounds=self.rounds,
                            initial=self.initial, confidence=self.confidence, patience=self.patience,
                            seed=work.spec.seed, measured=measured, proxies=_proxies(problem, traces))
        found = solver.solve(problem, within)
        if store is not None:
            work.measured_path = store.save(measured, problem)
        fit = found.info.get("held_out", {})
        reused = found.info["reused"]
        work.notify(f"surrogate: {found.info['evaluations']} allocations measured"
                    f"{f' ({reused} more reused from earlier searches)' if reused else ''}; fitness KL "
                    f"{found.info['start_measured']:.4g} -> {found.measured:.4g}"
                    + (f" (held-out Spearman {fit['spearman']:.2f}, the profile's sum {fit['additive_spearman']:.2f})"
                       if fit else ""))
        return found


def _proxies(problem: Problem, traces: Problem) -> list[np.ndarray]:
    """HAWQ-V3's cells as a second proxy of the same units and formats (a Hutchinson estimate
    can come out below 0 where the true trace is near it: counted as 0)."""
    if traces.unit_names != problem.unit_names or traces.format_names != problem.format_names:
        return []
    return [np.maximum(traces.error, 0.0)]


@dataclass
class Refine(Step):
    """EvoPress-style refinement for ``generations`` generations within the point's own size,
    by KL on growing window counts."""

    generations: int
    name = "refine"

    def __call__(self, work: Workspace, point: Allocation | None) -> Allocation | None:
        if point is None:
            return None
        spec = work.spec
        schedule = staged_schedule(spec.seq_len, work.fitness_samples)
        solver = get_solver("refine", measure=work.fitness, start=point, generations=self.generations,
                            schedule=schedule, seed=spec.seed)
        return solver.solve(work.problem, work.within(point))


def recipe(spec: JobSpec) -> list[Step]:
    """The steps a job asks for, in order: how the point is picked, then how it is improved."""
    first: Step = (Baseline() if spec.baseline else Target(spec.measured_kl) if spec.measured_kl is not None
                   else Solve(spec.budgets, spec.solver))
    return [first, *([Descend(spec.descend)] if spec.descend else []),
            *([Surrogate(spec.surrogate)] if spec.surrogate else []), *([Refine(spec.refine)] if spec.refine else [])]

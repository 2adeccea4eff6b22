"""The job pipeline: one function from a job spec to a stored front.

load -> calibrate -> profile (cached) -> solve (a front sweep, and the point at the
budget) -> evaluate the chosen point. ``bitalloc run`` and the workers call the same
``run_job``; the service adds persistence, queueing and HTTP around it.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from pathlib import Path

from quant.calibration import CalibrationSet, calibration_for, calibration_tokens, evaluation_tokens, shared_documents
from quant.evaluate import Evaluator, MeasuredKL
from quant.formats import parse_formats
from quant.hessian import calibration_hessians
from quant.linearize import KLGradient
from quant.loading import LoadedModel, LoadPolicy, load_model
from quant.profile import KVOptions, Profile, ProfileCache
from quant.progress import ProgressFn, no_progress
from quant.quantizers import Method
from quant.sensitivity import nncf_scores
from quant.units import UnitSet, enumerate_units
from search import Allocation, Budgets, Front, Problem, front, get_solver, smallest_within, solve
from search.solvers.refine import staged_schedule
from service.baselines import BaselineRequest, named_baseline
from service.problems import problem_of

EXACT_SOLVERS = ("dp", "ilp")
BUDGET_KEYS = {"avg_bits": "max_avg_bits", "bytes": "max_bytes", "latency": "max_latency", "error": "max_error"}
MEASURED = "measured_kl"  # a budget on KL measured by the model itself, not predicted by the profile
KL_METRICS = ("fisher_mse", "kl")  # metrics whose cells are KL in nats per token


@dataclass
class JobSpec:
    """Everything a job needs; the REST API and the CLI build one of these."""

    model: str
    formats: list[str]
    metric: str = "fisher_mse"
    solver: str = "dp"
    method: Method = "rtn"
    budgets: dict[str, float] = field(default_factory=dict)
    points: int = 32
    calibration: str | None = None
    seq_len: int = 512
    samples: int = 32
    seed: int = 0
    kv: KVOptions | None = None
    device: str = "h100"
    evaluation: str | None = "zoo:evaluation"
    eval_windows: int = 16
    baseline: str | None = None
    refine: int = 0
    descend: int = 0
    fitness_windows: int = 8
    gradient_windows: int = 8
    ties: bool = True

    @property
    def fitness_source(self) -> str:
        """The text measured search scores candidates on: the job's own calibration text (at
        other offsets) or, by default, the reference tuning split, which holds both kinds of
        text the reference evaluation does."""
        return self.calibration or "zoo:tuning"

    def budgets_object(self) -> Budgets:
        unknown = set(self.budgets) - set(BUDGET_KEYS) - {MEASURED}
        if unknown:
            raise ValueError(f"budgets: unknown keys {sorted(unknown)}; known: {sorted(BUDGET_KEYS) + [MEASURED]}")
        if MEASURED in self.budgets and len(self.budgets) > 1:
            raise ValueError(f"budgets: {MEASURED} asks for the smallest allocation that meets it; give it alone")
        return Budgets(**{BUDGET_KEYS[k]: v for k, v in self.budgets.items() if k != MEASURED})


@dataclass
class JobResult:
    profile: Profile
    profile_cached: bool
    front: Front
    chosen: Allocation | None
    evaluation: dict | None
    seconds: dict[str, float]

    def summary(self) -> dict:
        return {
            "profile": self.profile.meta, "profile_cached": self.profile_cached,
            "front": self.front.to_dict(), "chosen": None if self.chosen is None else self.chosen.to_dict(),
            "evaluation": self.evaluation, "seconds": self.seconds,
        }


def check_disjoint(calibration: str, evaluation: str) -> None:
    """Refuse a job whose evaluation text shares documents with its calibration text."""
    shared = shared_documents(calibration, evaluation)
    if shared:
        raise ValueError(f"calibration {calibration!r} and evaluation {evaluation!r} share {shared} document(s); "
                         "held-out evaluation must not see calibration text")


def run_job(spec: JobSpec, *, profile_dir: Path, policy: LoadPolicy = LoadPolicy(),
            progress: ProgressFn = no_progress) -> JobResult:
    """Run a job end to end; errors say what is wrong (bad input, infeasible budget, unknown model)."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] = round(now - clock, 2)
        clock = now

    formats = parse_formats(spec.formats)
    budgets = spec.budgets_object()
    progress(0, 1, "load")
    model = load_model(spec.model, policy)
    units = enumerate_units(model.module, example_inputs=model.example_inputs, kv_cache=spec.kv is not None)
    if model.is_causal_lm and spec.evaluation:
        for source in dict.fromkeys((spec.calibration or "zoo:calibration", spec.fitness_source)):
            check_disjoint(source, spec.evaluation)
    calibration = calibration_for(model, spec.calibration, seq_len=spec.seq_len, count=spec.samples, seed=spec.seed)
    progress(1, 1, "load")
    lap("load")

    profile, cached = ProfileCache(profile_dir).get_or_build(
        model, units, formats, spec.metric, calibration, method=spec.method, kv=spec.kv,
        device=spec.device, progress=progress)
    lap("profile")

    problem = problem_of(profile, ties=spec.ties)
    front_solver = spec.solver if spec.solver in EXACT_SOLVERS + ("nsga2",) else "dp"
    sweep = front(problem, ("error", "bytes"), spec.points, solver=front_solver)
    choosing = Choice(spec, model, units, calibration, problem, profile_dir)
    chosen = choosing.choose(budgets)
    if chosen is not None and spec.descend:
        progress(0, 1, "descend")
        chosen = choosing.descend(chosen)
    if chosen is not None and spec.refine:
        progress(0, 1, "refine")
        chosen = choosing.refine(chosen)
    progress(1, 1, "solve")
    lap("solve")

    evaluation = None
    if chosen is not None and model.is_causal_lm and spec.evaluation:
        progress(0, 1, "evaluate")
        evaluation = evaluate_point(model, chosen, spec, choosing.hessians)
        progress(1, 1, "evaluate")
        lap("evaluate")
    return JobResult(profile, cached, sweep, chosen, evaluation, seconds)


def evaluate_point(model: LoadedModel, allocation: Allocation, spec: JobSpec, hessians: dict | None = None) -> dict:
    """Held-out perplexity, KL and top-1 agreement of one allocation (GPTQ needs the Hessians)."""
    windows = evaluation_tokens(model.tokenizer, spec.evaluation, seq_len=spec.seq_len, max_windows=spec.eval_windows)
    result = Evaluator(model, windows).evaluate(allocation.formats, method=spec.method, hessians=hessians)
    return {"windows": windows.describe(), **result.to_dict()}


@dataclass
class Choice:
    """The solve phase's point at the budget: solved on the profile, a named baseline, the
    smallest allocation meeting a measured KL, and optionally improved by measurement
    (descent steps, then evolutionary refinement).

    Measured KL is taken on ``fitness_windows`` windows of ``spec.fitness_source`` (the job's
    calibration text at other random offsets than the profile's, or the reference tuning
    split): never on the evaluation text the result is judged on.
    Descent's gradients come from the first ``gradient_windows`` of the profile's own
    calibration windows, so the steps it proposes and the measurement that accepts them
    see different text.
    """

    spec: JobSpec
    model: LoadedModel
    units: UnitSet
    calibration: CalibrationSet
    problem: Problem
    profile_dir: Path

    @functools.cached_property
    def hessians(self) -> dict | None:
        """GPTQ's calibration Hessians, collected once for measurement and evaluation alike."""
        if self.spec.method != "gptq":
            return None
        return calibration_hessians(self.model.module, self.units, self.calibration)

    def choose(self, budgets: Budgets) -> Allocation | None:
        spec = self.spec
        if spec.baseline:
            return self.baseline(budgets)
        if MEASURED in spec.budgets:
            fitness = self.fitness
            samples = spec.fitness_windows * spec.seq_len
            return smallest_within(self.problem, spec.budgets[MEASURED],
                                   evaluator=lambda a: fitness.per_window(a, samples))
        if not spec.budgets:
            return None
        # An error budget alone asks for the smallest allocation within it, as `bitalloc solve` does.
        objective = "bytes" if set(spec.budgets) == {"error"} else "error"
        return solve(self.problem, budgets, solver=spec.solver, objective=objective)

    def baseline(self, budgets: Budgets) -> Allocation:
        request = BaselineRequest.parse(self.spec.baseline or "")
        unknown = sorted(set(request.formats()) - set(self.problem.format_names))
        if unknown:
            raise ValueError(f"baseline {self.spec.baseline!r} names formats {unknown} that are not among the job's formats")

        def trace_problem() -> Problem:
            profile, _ = ProfileCache(self.profile_dir).get_or_build(
                self.model, self.units, parse_formats(self.spec.formats), "hessian_trace", self.calibration,
                method=self.spec.method, kv=self.spec.kv, device=self.spec.device)
            return problem_of(profile)

        def scores() -> dict[str, float]:
            return nncf_scores(self.model.module, self.units.weights, batches=self.calibration.batches(4))

        return named_baseline(request, self.problem, self.units.units, budgets.max_avg_bits,
                              trace_problem=trace_problem, scores=scores)

    @functools.cached_property
    def fitness(self) -> MeasuredKL:
        if not self.model.is_causal_lm:
            raise ValueError("measured KL (descend, refine, measured_kl budgets) needs a causal language model")
        spec = self.spec
        windows = calibration_tokens(self.model.tokenizer, spec.fitness_source, seq_len=spec.seq_len,
                                     count=spec.fitness_windows, seed=spec.seed + 1)
        return MeasuredKL(Evaluator(self.model, windows, weight_cache_bytes=1e9), method=spec.method,
                          hessians=self.hessians)

    def within(self, start: Allocation) -> Budgets:
        """The start's own size (and latency, where the job bounds it): what measured search keeps to."""
        return Budgets(max_bytes=start.bytes, max_latency=start.latency if "latency" in self.spec.budgets else None)

    def descend(self, start: Allocation) -> Allocation:
        """Proximal descent steps within the start's own size: each step solves the KL's
        local model (its gradient at the current point) exactly and is kept only if it
        measures better."""
        if self.spec.metric not in KL_METRICS:
            raise ValueError(f"descend: the steps weigh KL gradients against the profile's error, so the metric must "
                             f"be in KL units {KL_METRICS}, not {self.spec.metric!r}")
        fitness = self.fitness
        evaluator = Evaluator(self.model, self.calibration.head(self.spec.gradient_windows), batch_size=2)
        evaluator.weights = fitness.evaluator.weights  # one cache of quantized cells for both
        problem = self.problem
        linear = KLGradient(evaluator, problem.unit_names, problem.format_names, problem.allowed,
                            method=self.spec.method, hessians=self.hessians)
        solver = get_solver("descent", evaluator=fitness, linear=lambda a: linear(a.formats), start=start,
                            samples=self.spec.fitness_windows * self.spec.seq_len, iterations=self.spec.descend)
        return solver.solve(problem, self.within(start))

    def refine(self, start: Allocation) -> Allocation:
        """EvoPress-style refinement within the start's own size, by KL on growing window counts."""
        schedule = staged_schedule(self.spec.seq_len, self.spec.fitness_windows * self.spec.seq_len)
        solver = get_solver("refine", evaluator=self.fitness, start=start, generations=self.spec.refine,
                            schedule=schedule, seed=self.spec.seed)
        return solver.solve(self.problem, self.within(start))

"""The point at the budget: solved on the profile, a named baseline, or the smallest
allocation meeting a measured KL; then improved by measurement (descent, refinement)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from bitalloc.pipeline.baselines import BaselineRequest, named_baseline
from bitalloc.pipeline.problem import problem_of
from bitalloc.pipeline.spec import KL_METRICS, JobSpec
from bitalloc.quant.calibration import CalibrationSet, calibration_tokens
from bitalloc.quant.evaluate import Evaluator, MeasuredKL
from bitalloc.quant.formats import parse_formats
from bitalloc.quant.hessian import calibration_hessians
from bitalloc.quant.linearize import KLGradient
from bitalloc.quant.loading import LoadedModel
from bitalloc.quant.profile import ProfileCache
from bitalloc.quant.sensitivity import nncf_scores
from bitalloc.quant.units import UnitSet
from bitalloc.search import Allocation, Budgets, Problem, get_solver, smallest_within, solve
from bitalloc.search.solvers.refine import staged_schedule


@dataclass
class PointSelector:
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

    def choose(self) -> Allocation | None:
        spec = self.spec
        if spec.baseline:
            return self.baseline(spec.budgets)
        if spec.measured_kl is not None:
            return smallest_within(self.problem, spec.measured_kl, measure=self.fitness, samples=self.fitness_samples)
        if not spec.budgets.given():
            return None
        return solve(self.problem, spec.budgets, solver=spec.solver, objective=spec.budgets.objective())

    def baseline(self, budgets: Budgets) -> Allocation:
        request = BaselineRequest.parse(self.spec.baseline or "")
        unknown = sorted(set(request.formats()) - set(self.problem.format_names))
        if unknown:
            raise ValueError(f"baseline {self.spec.baseline!r} names formats {unknown} that are not among the job's formats")

        def trace_problem() -> Problem:
            profile, _ = ProfileCache(self.profile_dir).get_or_build(
                self.model, self.units, parse_formats(self.spec.formats), "hessian_trace", self.calibration,
                method=self.spec.method, kv=self.spec.kv, hardware=self.spec.hardware)
            return problem_of(profile)

        def scores() -> dict[str, float]:
            return nncf_scores(self.model.module, self.units.weights, batches=self.calibration.batches(4))

        return named_baseline(request, self.problem, self.units.units, budgets.max_avg_bits,
                              trace_problem=trace_problem, scores=scores)

    @property
    def fitness_samples(self) -> int:
        return self.spec.fitness_windows * self.spec.seq_len

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
        bounded = self.spec.budgets.max_latency is not None
        return Budgets(max_bytes=start.bytes, max_latency=start.latency if bounded else None)

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
        solver = get_solver("descent", measure=fitness, linear=linear, start=start, samples=self.fitness_samples,
                            iterations=self.spec.descend)
        return solver.solve(problem, self.within(start))

    def refine(self, start: Allocation) -> Allocation:
        """EvoPress-style refinement within the start's own size, by KL on growing window counts."""
        schedule = staged_schedule(self.spec.seq_len, self.fitness_samples)
        solver = get_solver("refine", measure=self.fitness, start=start, generations=self.spec.refine,
                            schedule=schedule, seed=self.spec.seed)
        return solver.solve(self.problem, self.within(start))

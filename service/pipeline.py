"""The job pipeline: one function from a job spec to a stored front.

load -> calibrate -> profile (cached) -> solve (a front sweep, and the point at the
budget) -> evaluate the chosen point. ``bitalloc run`` and the workers call the same
``run_job``; the service adds persistence, queueing and HTTP around it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from quant.calibration import calibration_for, evaluation_tokens, shared_documents
from quant.evaluate import Evaluator
from quant.formats import parse_formats
from quant.hessian import calibration_hessians
from quant.loading import LoadedModel, LoadPolicy, load_model
from quant.profile import KVOptions, Profile, ProfileCache
from quant.progress import ProgressFn, no_progress
from quant.quantizers import Method
from quant.units import enumerate_units
from search import Allocation, Budgets, Front, Problem, front, solve

EXACT_SOLVERS = ("dp", "ilp")
BUDGET_KEYS = {"avg_bits": "max_avg_bits", "bytes": "max_bytes", "latency": "max_latency", "error": "max_error"}


@dataclass
class JobSpec:
    """Everything a job needs; the REST API and the CLI build one of these."""

    model: str
    formats: list[str]
    metric: str = "output_mse"
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

    def budgets_object(self) -> Budgets:
        unknown = set(self.budgets) - set(BUDGET_KEYS)
        if unknown:
            raise ValueError(f"budgets: unknown keys {sorted(unknown)}; known: {sorted(BUDGET_KEYS)}")
        return Budgets(**{BUDGET_KEYS[k]: v for k, v in self.budgets.items()})


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


def problem_of(profile: Profile) -> Problem:
    """The search problem a profile poses (every cell allowed by the profile, its tie groups)."""
    arrays = profile.arrays()
    return Problem(arrays["error"], arrays["bytes"], arrays["numel"], arrays["unit_names"], arrays["format_names"],
                   latency=arrays["latency"], allowed=arrays["allowed"], tie_groups=arrays["tie_groups"])


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
        check_disjoint(spec.calibration or "zoo:calibration", spec.evaluation)
    calibration = calibration_for(model, spec.calibration, seq_len=spec.seq_len, count=spec.samples, seed=spec.seed)
    progress(1, 1, "load")
    lap("load")

    profile, cached = ProfileCache(profile_dir).get_or_build(
        model, units, formats, spec.metric, calibration, method=spec.method, kv=spec.kv,
        device=spec.device, progress=progress)
    lap("profile")

    problem = problem_of(profile)
    front_solver = spec.solver if spec.solver in EXACT_SOLVERS + ("nsga2",) else "dp"
    sweep = front(problem, ("error", "bytes"), spec.points, solver=front_solver)
    # An error budget alone asks for the smallest allocation within it, as `bitalloc solve` does.
    objective = "bytes" if set(spec.budgets) == {"error"} else "error"
    chosen = solve(problem, budgets, solver=spec.solver, objective=objective) if spec.budgets else None
    progress(1, 1, "solve")
    lap("solve")

    evaluation = None
    if chosen is not None and model.is_causal_lm and spec.evaluation:
        progress(0, 1, "evaluate")
        hessians = None
        if spec.method == "gptq":
            hessians = calibration_hessians(model.module, units, calibration)
        evaluation = evaluate_point(model, chosen, spec, hessians)
        progress(1, 1, "evaluate")
        lap("evaluate")
    return JobResult(profile, cached, sweep, chosen, evaluation, seconds)


def evaluate_point(model: LoadedModel, allocation: Allocation, spec: JobSpec, hessians: dict | None = None) -> dict:
    """Held-out perplexity, KL and top-1 agreement of one allocation (GPTQ needs the Hessians)."""
    windows = evaluation_tokens(model.tokenizer, spec.evaluation, seq_len=spec.seq_len, max_windows=spec.eval_windows)
    result = Evaluator(model, windows).evaluate(allocation.formats, method=spec.method, hessians=hessians)
    return {"windows": windows.describe(), **result.to_dict()}

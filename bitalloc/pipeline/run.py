"""The job pipeline: one function from a job spec to a front and the chosen point.

load -> calibrate -> profile (cached) -> solve (a front sweep; the point at the budget and
its measured improvement, the ``steps`` of the job's ``recipe``) -> evaluate the chosen
point. ``bitalloc run`` and the workers call the same ``run_job``; the service adds
persistence, queueing and HTTP around it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bitalloc.pipeline.inputs import check_inputs
from bitalloc.pipeline.problem import problem_of
from bitalloc.pipeline.spec import JobSpec
from bitalloc.pipeline.steps import Workspace, recipe
from bitalloc.quant.calibration import CalibrationSet, calibration_for, evaluation_tokens, shared_documents
from bitalloc.quant.device import resolve_device
from bitalloc.quant.evaluate import Evaluator
from bitalloc.quant.formats import parse_formats
from bitalloc.quant.hessian import BlockHessians, Hessians
from bitalloc.quant.loading import LoadedModel, LoadPolicy, model_dtype
from bitalloc.quant.metrics.context import ProfilingContext
from bitalloc.quant.metrics.streamed import check_streamable
from bitalloc.quant.profile import Profile, ProfileCache, compute_of
from bitalloc.quant.progress import ProgressFn, no_progress
from bitalloc.quant.shards import Shard, ShardRows, ShardRunner, decode_inputs, in_sequence, shard_rows
from bitalloc.quant.stream import StreamedModel, load_within
from bitalloc.quant.units import UnitSet
from bitalloc.search import Allocation, Front, front

EXACT_SOLVERS = ("dp", "ilp")


@dataclass
class JobResult:
    profile: Profile
    profile_cached: bool
    front: Front
    chosen: Allocation | None
    evaluation: dict | None
    seconds: dict[str, float]
    notes: list[str] = field(default_factory=list)
    compute: dict = field(default_factory=dict)  # where the job computed: device, dtype, streamed or not
    measured: Path | None = None  # the surrogate's measured allocations (``pipeline.measured``), when it ran

    def summary(self) -> dict:
        return {
            "profile": self.profile.meta, "profile_cached": self.profile_cached,
            "front": self.front.to_dict(), "chosen": None if self.chosen is None else self.chosen.to_dict(),
            "evaluation": self.evaluation, "seconds": self.seconds, "notes": self.notes, "compute": self.compute,
        }


def check_disjoint(calibration: str, evaluation: str) -> None:
    """Refuse a job whose evaluation text shares documents with its calibration text."""
    shared = shared_documents(calibration, evaluation)
    if shared:
        raise ValueError(f"calibration {calibration!r} and evaluation {evaluation!r} share {shared} document(s); "
                         "held-out evaluation must not see calibration text")


def check_streamed(spec: JobSpec, why: str) -> None:
    """Refuse, before any profiling, what a job cannot do on a model streamed block by block
    (``why`` it streams: asked for, or its weights do not fit): a metric with no streamed form,
    or shards of one that walks the whole model. Everything else streams like the profile."""
    try:
        check_streamable(spec.metric, spec.shards)
    except ValueError as exc:
        raise ValueError(f"the model is streamed block by block ({why}), and {exc}") from exc


def run_job(spec: JobSpec, *, profile_dir: Path, policy: LoadPolicy = LoadPolicy(),
            progress: ProgressFn = no_progress, notify: Callable[[str], None] = lambda message: None,
            runner: ShardRunner = in_sequence) -> JobResult:
    """Run a job end to end; errors say what is wrong (bad input, infeasible budget, unknown model).
    ``notify`` hears what the user should know as soon as it is known (a budget that does not bind);
    ``runner`` runs a streamed profile's shards (``quant.shards``)."""
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[phase] = round(now - clock, 2)
        clock = now

    check_inputs(spec, policy)
    formats = parse_formats(spec.formats)
    progress(0, 1, "load")
    model, units, calibration = _load(spec, policy, spec.stream)
    streamed = isinstance(model, StreamedModel)
    if streamed:
        check_streamed(spec, model.info.get("streamed", "asked for"))
    compute = {**compute_of(model), "streamed": streamed}
    if model.is_causal_lm and spec.evaluation:
        for source in dict.fromkeys((spec.calibration or "zoo:calibration", spec.fitness_source)):
            check_disjoint(source, spec.evaluation)
    progress(1, 1, "load")
    lap("load")

    profile, cached = ProfileCache(profile_dir).get_or_build(
        model, units, formats, spec.metric, calibration, method=spec.method, kv=spec.kv,
        hardware=spec.hardware, progress=progress, shards=spec.shards, runner=runner)
    lap("profile")

    problem = problem_of(profile, ties=spec.ties)
    front_solver = spec.solver if spec.solver in EXACT_SOLVERS + ("nsga2",) else "dp"
    sweep = front(problem, ("error", "bytes"), spec.points, solver=front_solver)
    work = Workspace(spec, model, units, calibration, problem, profile_dir, notify, profile_key=profile.meta["key"])
    chosen = None
    for step in recipe(spec):
        progress(0, 1, step.name)
        chosen = step(work, chosen)
    progress(1, 1, "solve")
    lap("solve")

    evaluation = None
    if chosen is not None and model.is_causal_lm and spec.evaluation:
        progress(0, 1, "evaluate")
        evaluation = evaluate_point(model, chosen, spec, units, work.hessians)
        progress(1, 1, "evaluate")
        lap("evaluate")
    return JobResult(profile, cached, sweep, chosen, evaluation, seconds, work.notes, compute, work.measured_path)


def _load(spec: JobSpec, policy: LoadPolicy, stream: bool) -> tuple[LoadedModel, UnitSet, CalibrationSet]:
    """The job's model (streamed when asked or when its weights do not fit), its units and its
    calibration windows: the same for the job and for each of its shards, wherever they run."""
    device = resolve_device(spec.device)
    model = load_within(spec.model, policy, dtype=model_dtype(spec.dtype, device), device=device,
                        max_memory=spec.max_memory, stream=stream)
    calibration = calibration_for(model, spec.calibration, seq_len=spec.seq_len, count=spec.samples, seed=spec.seed,
                                  bos=spec.bos)
    return model, model.units(kv_cache=spec.kv is not None), calibration


def measure_shard(spec: JobSpec, shard: Shard, inputs: bytes, *, policy: LoadPolicy = LoadPolicy(),
                  progress: ProgressFn = no_progress) -> ShardRows:
    """One shard of the job's streamed profile, in a process of its own (another worker): the
    model streamed as the job streams it, the context as the job builds it, the shared
    quantities and boundary states from the job's own walk (``quant.shards.encode_inputs``)."""
    check_inputs(spec, policy)
    model, units, calibration = _load(spec, policy, stream=True)
    ctx = ProfilingContext(model, units, parse_formats(spec.formats), calibration, spec.method, progress=progress)
    shared, entry = decode_inputs(inputs)
    return shard_rows(ctx, spec.metric, shard, shared, entry, spec.shards)


def evaluate_point(model: LoadedModel, allocation: Allocation, spec: JobSpec, units: UnitSet,
                   hessians: Hessians | BlockHessians | None = None) -> dict:
    """Held-out perplexity, KL and top-1 agreement of one allocation (GPTQ needs the Hessians),
    with its bytes and average bits as the evaluated model holds them."""
    windows = evaluation_tokens(model.tokenizer, spec.evaluation, seq_len=spec.seq_len, max_windows=spec.eval_windows,
                                bos=spec.bos)
    # One evaluation: caching the reference's log-probabilities for a second would only hold
    # windows x tokens x vocabulary floats (1.6 GB for SmolLM2's 16 windows) for nothing.
    evaluator = Evaluator(model, windows, cache_bytes=0)
    result = evaluator.evaluate(allocation.formats, method=spec.method, hessians=hessians, units=units)
    return {"windows": windows.describe(), **result.to_dict()}

"""Search quality on the reference LM: bitalloc's allocations against the ones users would
otherwise pick, all scored on the held-out evaluation split.

For each quantizer (RTN, GPTQ) it profiles SmolLM2-135M once per metric (cached), builds
every baseline of ``search.baselines`` (uniform, two-width mixes by whole layers,
llama.cpp's per-tensor mixes in both modes, HAWQ-V3's trace ILP with and without tie
groups, NNCF's ratio rule) and bitalloc's own methods (each metric with the exact solver,
NSGA-II, measured descent and refinement; the headline ``fisher_mse`` + ``dp`` tied and
untied), at the target average bits and at every baseline's own bits, and scores each
allocation with ``quant.evaluate``: KL from the 16-bit model, perplexity, top-1 agreement,
bits and bytes, and the method's wall time. Then:

- the goal check, per runtime: for every baseline point in the useful band (its KL between
  ``--band``), the best bitalloc allocation of at most its bits that runs where it runs
  (tied only, for runtimes that fuse q/k/v and gate/up; anything, for runtimes that store
  tensors apart), and whether its KL is at least 30 % lower;
- the KV cache in the same memory budget at two context lengths (``--kv-contexts``);
- accuracy-target mode: bisection over the front by the 95 % upper bound of KL measured
  window by window on the tuning text, checked on the evaluation split.

Measured search (descent, refinement, the accuracy target) scores on ``--fitness-source``
(default ``zoo:tuning``: speeches and a novel, like the evaluation split, never it).

Prints tables, writes ``bench/results/quality.json`` and draws ``bench/results/quality.png``
(KL against average bits, one line per method). ``--quick`` runs a small smoke version.
Every scored point is checkpointed: ``--resume`` reuses them, ``--append`` adds this run's
points and parts to an existing result (``resumed_points`` in the JSON counts the reused ones).

    python -m bench.quality [--threads 2] [--quantizers rtn,gptq] [--eval-windows 16] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from bitalloc.pipeline.baselines import model_info, unit_infos
from bitalloc.pipeline.problem import problem_of
from bitalloc.quant.calibration import calibration_tokens, evaluation_tokens
from bitalloc.quant.costs import LatencyModel
from bitalloc.quant.evaluate import Evaluator, MeasuredKL, QuantizedWeights
from bitalloc.quant.formats import get_format
from bitalloc.quant.kv import KVOptions
from bitalloc.quant.linearize import KLGradient
from bitalloc.quant.loading import LoadedModel, load_model
from bitalloc.quant.metrics import METRICS
from bitalloc.quant.metrics.context import ProfilingContext
from bitalloc.quant.metrics.hessian_trace import hutchinson_traces, trace_errors
from bitalloc.quant.metrics.kv_kl import kv_errors
from bitalloc.quant.profile import Profile, cost_tables, model_fingerprint, profile_key
from bitalloc.quant.sensitivity import nncf_scores
from bitalloc.quant.units import UnitSet, enumerate_units
from bitalloc.search import Allocation, Budgets, Problem, baselines, get_solver, smallest_within, solve
from bitalloc.search.solvers.refine import staged_schedule

RESULTS = Path(__file__).resolve().parent / "results"
CACHE = Path.home() / ".cache" / "bitalloc" / "bench" / "quality"
FORMATS = ("int2_g128", "int3_g128", "int4_g128", "int5_g128", "int6_g128", "int8_g128",
           "int3_g64", "int4_g64", "int5_g64", "int3_g32", "int4_g32", "int3_g128_asym", "int4_g128_asym")
WIDTHS = ("int2_g128", "int3_g128", "int4_g128", "int5_g128", "int6_g128", "int8_g128")
HEADLINE = "bitalloc fisher_mse+dp"
HEADLINE_UNTIED = "bitalloc fisher_mse+dp (untied)"
DESCENT = "bitalloc fisher_mse+dp+descent"
DESCENT_UNTIED = "bitalloc fisher_mse+dp+descent (untied)"
PROXIES = ("fisher_mse", "output_mse")
LLAMA_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K")


def formats_for(quantizer: str) -> list:
    """Every candidate for RTN; the g128 widths for GPTQ, whose cells cost far more (both
    sides of every comparison always share the quantizer and the formats)."""
    return [get_format(name) for name in (FORMATS if quantizer == "rtn" else WIDTHS)]


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Point:
    """One allocation scored on the evaluation split."""

    quantizer: str
    family: str
    label: str
    target: float | None
    avg_bits: float
    bytes: int
    kl: float
    perplexity: float
    top1: float
    seconds: float
    info: dict = field(default_factory=dict)
    tied: bool = True  # whether fused units (q/k/v, gate/up) share a format, as vLLM needs


class Bench:
    """The model, its units, the token sets and an evaluator shared by every method."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model: LoadedModel = load_model("zoo:llm")
        self.units: UnitSet = enumerate_units(self.model.module, example_inputs=self.model.example_inputs)
        tokenizer = self.model.tokenizer
        self.calibration = calibration_tokens(tokenizer, "zoo:calibration", seq_len=args.seq_len,
                                              count=args.calibration_windows, seed=0)
        self.windows = evaluation_tokens(tokenizer, "zoo:evaluation", seq_len=args.seq_len, max_windows=args.eval_windows)
        # Fitness text for measured search: the tuning split by default, never the evaluation split.
        self.fitness = calibration_tokens(tokenizer, args.fitness_source, seq_len=args.seq_len,
                                          count=args.fitness_windows, seed=1)
        self.cache = QuantizedWeights(args.weight_cache_gb * 1e9)
        self.evaluator = Evaluator(self.model, self.windows)
        self.fitness_evaluator = Evaluator(self.model, self.fitness)
        # Descent's gradients: the first calibration windows (the profile's text), never the fitness or evaluation text.
        self.gradient_evaluator = Evaluator(self.model, self.calibration.head(args.gradient_windows), batch_size=2)
        for evaluator in (self.evaluator, self.fitness_evaluator, self.gradient_evaluator):
            evaluator.weights = self.cache  # quantize each cell once for all
        self.fingerprint = model_fingerprint(self.model.module)
        self.infos = unit_infos(self.units.units)
        self.model_info = model_info(self.units.units)
        self.contexts: dict[str, ProfilingContext] = {}
        self.points: list[Point] = []
        # Every scored point is checkpointed; --resume reuses them instead of evaluating again.
        self.checkpoint = Path(args.out).with_suffix(".points.json")
        self.done: dict[tuple[str, str], Point] = {}
        self.resumed = 0  # points taken from the checkpoint instead of evaluated again
        if args.resume and self.checkpoint.exists():
            self.done = {(p["quantizer"], p["label"]): Point(**p) for p in json.loads(self.checkpoint.read_text())}

    def context(self, quantizer: str) -> ProfilingContext:
        """One profiling context per quantizer: its Hessians (GPTQ's too) are collected once."""
        if quantizer not in self.contexts:
            ctx = ProfilingContext(self.model, self.units, formats_for(quantizer), self.calibration, quantizer,  # type: ignore[arg-type]
                                   progress=printing_progress, cache=self.cache if quantizer == "gptq" else None)
            if self.contexts:
                ctx.hessians = next(iter(self.contexts.values())).hessians  # type: ignore[misc]  (same data, same H)
            self.contexts[quantizer] = ctx
        return self.contexts[quantizer]

    def hessians_for(self, quantizer: str) -> dict | None:
        return self.context(quantizer).hessians if quantizer == "gptq" else None

    def traces(self) -> np.ndarray:
        """Hutchinson traces on the first ``--trace-tokens`` tokens of the first ``--trace-windows``
        calibration windows (a double backward per vector, one window at a time: a few windows,
        as HAWQ does), cached on disk."""
        subset = self.calibration.head(self.args.trace_windows, self.args.trace_tokens)
        digest = hashlib.sha256(subset.inputs.numpy().tobytes() + self.fingerprint.encode()).hexdigest()[:16]
        path = CACHE / f"traces-{digest}-{self.args.trace_samples}.npy"  # the digest covers the windows and the model
        if path.exists():
            return np.load(path)
        log("Hutchinson traces ...")
        ctx = ProfilingContext(self.model, self.units, formats_for("rtn"), subset, batch_size=1, progress=printing_progress)
        traces = hutchinson_traces(ctx, self.args.trace_samples)
        CACHE.mkdir(parents=True, exist_ok=True)
        np.save(path, traces)
        return traces

    def profile(self, metric: str, quantizer: str) -> Profile:
        """The weight profile for ``metric`` by ``quantizer``, from the disk cache when built before."""
        formats = formats_for(quantizer)
        key = profile_key(self.fingerprint, f"{metric}/{self.args.trace_samples}", self.calibration, formats,
                          quantizer, self.units, None, "h100")  # type: ignore[arg-type]
        path = CACHE / f"{key}.npz"
        if path.exists():
            return Profile.load(path)
        log(f"profile {metric} ({quantizer}) ...")
        start = time.perf_counter()
        ctx = self.context(quantizer)
        error = trace_errors(ctx, self.traces()) if metric == "hessian_trace" else METRICS[metric](ctx)
        nbytes, seconds, allowed = cost_tables(self.units.weights, formats, LatencyModel.for_hardware("h100"), None)
        profile = Profile(self.units.weights, [f.name for f in formats], error, nbytes, seconds, allowed, self.units.tie_groups,
                          {"model": "zoo:llm", "metric": metric, "method": quantizer, "key": key,
                           "seconds": round(time.perf_counter() - start, 1)})
        profile.save(path)
        return profile

    def latest(self, quantizer: str, family: str, target: float) -> Point:
        """The last point scored for a method at a target: where a measured search started."""
        return next(p for p in reversed(self.points) if p.quantizer == quantizer and p.family == family and p.target == target)

    def resume(self, quantizer: str, label: str) -> Point | None:
        """The checkpointed point of a measured search, taken as it is (its allocation is not
        solved again: that is the expensive part); None when it must be run."""
        point = self.done.get((quantizer, label))
        if point is not None:
            self.points.append(point)
            self.resumed += 1
        return point

    def respects_ties(self, allocation: Allocation) -> bool:
        """Whether every tie group's units share one format (deployable where they are fused)."""
        formats = allocation.formats
        return all(len({formats[name] for name in group}) == 1 for group in self.units.tie_groups)

    def score(self, allocation: Allocation, quantizer: str, family: str, label: str, target: float | None,
              seconds: float, info: dict | None = None) -> Point:
        if self.resume(quantizer, label) is not None:
            self.points[-1] = replace(self.points[-1], tied=self.respects_ties(allocation))
            return self.points[-1]
        result = self.evaluator.evaluate(allocation.formats, method=quantizer, hessians=self.hessians_for(quantizer),  # type: ignore[arg-type]
                                         units=self.units)
        point = Point(quantizer, family, label, target, round(float(result.avg_bits), 4), int(result.bytes),
                      result.kl, result.perplexity, result.top1, round(seconds, 2), info or {}, self.respects_ties(allocation))
        self.points.append(point)
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        kept = {**self.done, **{(p.quantizer, p.label): p for p in self.points}}  # never lose resumable points
        self.checkpoint.write_text(json.dumps([asdict(p) for p in kept.values()], indent=0))
        log(f"  {quantizer:<5}{label:<40}{point.avg_bits:>7.3f} b  KL {point.kl:.4f}  ppl {point.perplexity:.2f}")
        return point


def budget_label(bits: float) -> str:
    """A budget as a label names it: exact to the 4 decimals points' bits are kept to, so two
    budgets (a target of 5 and a baseline's 4.9999) are never one checkpointed point."""
    return f"{round(bits, 4):g}"


def printing_progress(done: int, total: int, phase: str) -> None:
    if done == total or done % max(total // 5, 1) == 0:
        log(f"    {phase}: {done}/{total}")


def timed(make: Callable[[], Allocation]) -> tuple[Allocation, float]:
    start = time.perf_counter()
    allocation = make()
    return allocation, time.perf_counter() - start


def run_proxies(bench: Bench, quantizer: str, targets: list[float]) -> None:
    """Each metric, solved exactly (``dp``) at every target."""
    for metric in PROXIES:
        problem = problem_of(bench.profile(metric, quantizer))
        for target in targets:
            allocation, seconds = timed(lambda: solve(problem, Budgets(max_avg_bits=target)))
            bench.score(allocation, quantizer, f"bitalloc {metric}+dp", f"{metric}+dp @{target:g}", target, seconds)


def run_headline_at(bench: Bench, quantizer: str, bits: list[float], ties: bool = True) -> None:
    """The headline method at the bits of every baseline point it must be compared with;
    ``ties=False`` for the baselines that store fused units apart (llama.cpp's mixes)."""
    problem = problem_of(bench.profile("fisher_mse", quantizer), ties=ties)
    family, suffix = (HEADLINE, "") if ties else (HEADLINE_UNTIED, " untied")
    done = {p.label for p in bench.points if p.family == family and p.quantizer == quantizer}
    for b in sorted(set(bits)):
        label = f"fisher_mse+dp @{budget_label(b)}{suffix}"
        if label in done:
            continue
        done.add(label)
        allocation, seconds = timed(lambda: solve(problem, Budgets(max_avg_bits=b)))
        bench.score(allocation, quantizer, family, label, b, seconds)


def run_nsga2(bench: Bench, quantizer: str, targets: list[float]) -> None:
    """NSGA-II (pymoo) on the headline proxy at each target: the heuristic's gap, measured."""
    problem = problem_of(bench.profile("fisher_mse", quantizer))
    for target in targets:
        allocation, seconds = timed(lambda: solve(problem, Budgets(max_avg_bits=target), solver="nsga2"))
        bench.score(allocation, quantizer, "bitalloc fisher_mse+nsga2", f"fisher_mse+nsga2 @{target:g}", target, seconds)


def run_refine(bench: Bench, quantizer: str, targets: list[float]) -> list[dict]:
    """Measured refinement from the headline allocation, by KL on the fitness text (growing
    sample counts), judged on the evaluation split."""
    problem = problem_of(bench.profile("fisher_mse", quantizer))
    window = bench.args.seq_len
    fitness = MeasuredKL(bench.fitness_evaluator, method=quantizer, hessians=bench.hessians_for(quantizer))  # type: ignore[arg-type]
    schedule = staged_schedule(window, len(bench.fitness.inputs) * window)
    rows = []
    for target in targets:
        budgets = Budgets(max_avg_bits=target)
        start = solve(problem, budgets)
        solver = get_solver("refine", measure=fitness, start=start, generations=bench.args.refine_generations,
                            offspring=bench.args.refine_offspring, schedule=schedule, seed=0)
        refined, seconds = timed(lambda: solver.solve(problem, budgets))
        before = bench.latest(quantizer, HEADLINE, target)
        after = bench.score(refined, quantizer, "bitalloc fisher_mse+dp+refine", f"refine @{target:g}", target, seconds,
                            {"fitness_start": refined.info["start_measured"], "fitness_end": refined.measured,
                             "evaluations": refined.info["evaluations"]})
        rows.append({"quantizer": quantizer, "target": target, "fitness_start": refined.info["start_measured"],
                     "fitness_end": refined.measured, "eval_start": before.kl, "eval_end": after.kl,
                     "seconds": round(seconds, 1), "evaluations": refined.info["evaluations"]})
    return rows


def run_descent(bench: Bench, quantizer: str, targets: list[float], ties: bool = True) -> list[dict]:
    """Measured descent from the headline allocation at each target: proximal steps on the KL's
    gradient at the current point (on calibration windows), each kept only if its KL on the
    fitness windows is lower by a paired test over them; judged on the evaluation split."""
    return [descend_at(bench, quantizer, t, ties) for t in targets]


def run_descent_where_missed(bench: Bench, quantizer: str, band: tuple[float, float]) -> list[dict]:
    """Descent at the bits of every baseline point the goal still misses, on its runtime (tied
    where fused units must share a format): a user comparing with, say, Q6_K asks for Q6_K's
    bits, not for the nearest round target. Skipped where a descent point already sits at
    those bits or just below."""
    rows = []
    misses = {(r["bits"], r["runtime"] == "fused") for r in goal_rows(bench, band)
              if r["quantizer"] == quantizer and not r["holds"]}
    for bits, ties in sorted(misses):
        family = DESCENT if ties else DESCENT_UNTIED
        if any(p.quantizer == quantizer and p.family == family and bits - 0.01 <= p.target <= bits + 1e-9
               for p in bench.points):
            continue
        rows.append(descend_at(bench, quantizer, bits, ties))
    return rows


def descend_at(bench: Bench, quantizer: str, bits: float, ties: bool) -> dict:
    """One descent from the headline allocation at ``bits`` (scored there before), scored; a
    checkpointed point is reused without solving again. Returns its row of the descent table."""
    family, start_family = (DESCENT, HEADLINE) if ties else (DESCENT_UNTIED, HEADLINE_UNTIED)
    label = f"descent @{budget_label(bits)}{'' if ties else ' untied'}"
    before = bench.latest(quantizer, start_family, bits)
    after = bench.resume(quantizer, label)
    if after is None:
        problem = problem_of(bench.profile("fisher_mse", quantizer), ties=ties)
        budgets = Budgets(max_avg_bits=bits)
        hessians = bench.hessians_for(quantizer)
        fitness = MeasuredKL(bench.fitness_evaluator, method=quantizer, hessians=hessians)  # type: ignore[arg-type]
        linear = KLGradient(bench.gradient_evaluator, problem.unit_names, problem.format_names, problem.allowed,
                            method=quantizer, hessians=hessians)  # type: ignore[arg-type]
        solver = get_solver("descent", measure=fitness, linear=linear, start=solve(problem, budgets),
                            samples=len(bench.fitness.inputs) * bench.args.seq_len, iterations=bench.args.descent_iterations)
        result, seconds = timed(lambda: solver.solve(problem, budgets))
        iterations = result.info["iterations"]
        after = bench.score(result, quantizer, family, label, bits, seconds,
                            {"fitness_start": result.info["start_measured"], "fitness_end": result.measured,
                             "steps": [it.get("accepted") for it in iterations],
                             "p_values": [it.get("p_value") for it in iterations]})
    return {"quantizer": quantizer, "target": bits, "ties": ties, "fitness_start": after.info["fitness_start"],
            "fitness_end": after.info["fitness_end"], "eval_start": before.kl, "eval_end": after.kl,
            "steps": after.info["steps"], "p_values": after.info.get("p_values"), "seconds": after.seconds}


KV_FORMATS = ("int2_g128", "int4_g128", "int8_g128", "bf16")


def kv_problem(bench: Bench, context: int) -> tuple[Problem, UnitSet]:
    """Weights (the headline RTN profile) and every layer's K and V cache in one problem,
    costed at ``context`` tokens for one sequence; KV cells are measured KL (``kv_kl``)."""
    units = enumerate_units(bench.model.module, example_inputs=bench.model.example_inputs, kv_cache=True)
    weights = bench.profile("fisher_mse", "rtn")
    names = list(FORMATS) + ["bf16"]
    formats = [get_format(n) for n in names]
    caches = [u for u in units.units if u.kind != "weight"]
    path = CACHE / f"kv-{bench.fingerprint[:16]}-{bench.calibration.describe()['inputs_sha256'][:16]}-{bench.args.kv_tokens}.npy"
    kv_formats = [get_format(n) for n in KV_FORMATS]
    if path.exists():
        kv = np.load(path)
    else:
        log("kv_kl ...")
        ctx = ProfilingContext(bench.model, units, kv_formats, bench.calibration, options={"kl_tokens": bench.args.kv_tokens})
        kv = kv_errors(ctx, caches)
        np.save(path, kv)
    error = np.zeros((len(units.units), len(names)))
    allowed = np.zeros_like(error, dtype=bool)
    rows = {u.name: i for i, u in enumerate(weights.units)}
    for i, unit in enumerate(units.units):
        if unit.kind == "weight":
            error[i, : len(FORMATS)] = weights.error[rows[unit.name]]
            allowed[i] = True
        else:
            k = [u.name for u in caches].index(unit.name)
            for j, name in enumerate(KV_FORMATS):
                error[i, names.index(name)] = kv[k, j]
                allowed[i, names.index(name)] = True
    nbytes, seconds, _ = cost_tables(units.units, formats, LatencyModel.for_hardware("h100"), KVOptions(context=context))
    profile = Profile(units.units, names, np.nan_to_num(error), nbytes, seconds, allowed, units.tie_groups,
                      {"metric": "fisher_mse+kv_kl", "kv": {"context": context, "batch": 1}})
    return problem_of(profile), units


def run_kv(bench: Bench) -> list[dict]:
    """At one total memory (weights + KV cache) per context length, four allocations:
    weights only with a 16-bit cache, uniform 4-bit KV, uniform 2-bit KV, the joint one."""
    rows = []
    for context in bench.args.kv_contexts:
        problem, units = kv_problem(bench, context)
        caches = [i for i, u in enumerate(units.units) if u.kind != "weight"]
        weights = [i for i, u in enumerate(units.units) if u.kind == "weight"]
        col = {name: problem.format_names.index(name) for name in problem.format_names}
        kv_bytes = {name: int(sum(problem.bytes[i, col[name]] for i in caches)) for name in ("bf16", "int4_g128", "int2_g128")}
        uniform4 = int(sum(problem.bytes[i, col["int4_g128"]] for i in weights))
        memory = uniform4 + kv_bytes["bf16"]  # the memory of int4 weights with a 16-bit cache
        candidates: dict[str, Allocation] = {}
        for label, kv_format in (("weights only, 16-bit KV", "bf16"), ("uniform 4-bit KV", "int4_g128"),
                                 ("uniform 2-bit KV", "int2_g128")):
            fixed = {i: col[kv_format] for i in caches}
            candidates[label] = solve(replace(problem, fixed=fixed), Budgets(max_bytes=memory))
        candidates["bitalloc joint"] = solve(problem, Budgets(max_bytes=memory))
        for label, allocation in candidates.items():
            result = bench.evaluator.evaluate(allocation.formats, units=units)
            kv_total = int(sum(problem.bytes[i, allocation.choice[i]] for i in caches))
            rows.append({"context": context, "memory": memory, "allocation": label, "bytes": allocation.bytes,
                         "kv_bytes": kv_total, "weight_avg_bits": round(float(result.avg_bits), 3),
                         "kl": result.kl, "perplexity": result.perplexity, "top1": result.top1,
                         "kv_formats": sorted({allocation.formats[units.units[i].name] for i in caches})})
            log(f"  ctx {context:>6} {label:<26} KV {kv_total / 2**20:8.1f} MiB  KL {result.kl:.4f}")
    return rows


def run_target(bench: Bench, targets: list[float]) -> list[dict]:
    """Accuracy-target mode: the smallest allocation whose KL, measured window by window on
    the fitness text at the search's bisection steps, meets the target with 95 % confidence;
    then its KL on the evaluation split."""
    problem = problem_of(bench.profile("fisher_mse", "rtn"))
    fitness = MeasuredKL(bench.fitness_evaluator)
    samples = len(bench.fitness.inputs) * bench.args.seq_len
    rows = []
    for target in targets:
        allocation, seconds = timed(lambda: smallest_within(problem, target, measure=fitness, samples=samples,
                                                            steps=bench.args.target_steps))
        point = bench.score(allocation, "rtn", "accuracy target", f"KL <= {target:g}", None, seconds)
        rows.append({"target_kl": target, "avg_bits": point.avg_bits, "calibration_kl": allocation.measured,
                     "calibration_bound": allocation.info["measured_bound"],
                     "evaluation_kl": point.kl, "holds": point.kl <= target, "seconds": round(seconds, 1)})
    return rows


def pair_for(target: float, bits: dict[str, float]) -> tuple[str, str] | None:
    """The adjacent widths (g128) around ``target``: the low one fits it, the high one does not."""
    for low, high in zip(WIDTHS, WIDTHS[1:]):
        if bits[low] <= target < bits[high]:
            return low, high
    return None


def run_baselines(bench: Bench, quantizer: str, targets: list[float]) -> None:
    """Every baseline of ``search.baselines``, scored like bitalloc's own allocations."""
    problem = problem_of(bench.profile("fisher_mse", quantizer))  # baselines choose formats by rule; bytes are exact
    bits = {name: baselines.uniform(problem, name).avg_bits for name in WIDTHS}
    lean = quantizer != "rtn"  # GPTQ costs far more per cell: llama.cpp's real mixes only
    for name in problem.format_names:
        allocation, seconds = timed(lambda: baselines.uniform(problem, name))
        bench.score(allocation, quantizer, "uniform", f"uniform {name}", None, seconds)
    for target in targets:
        pair = pair_for(target, bits)
        if pair is not None:
            allocation, seconds = timed(lambda: baselines.layer_mix(problem, bench.infos, *pair, target))
            bench.score(allocation, quantizer, "two-width by layers", f"layers {pair[0]}/{pair[1]} @{target:g}", target, seconds)
    modes = ((True, "llama.cpp (as llama-quantize writes)"), (False, "llama.cpp (plain rules)"))
    for fallback, family in modes[:1] if lean else modes:
        for ftype in LLAMA_TYPES:
            allocation, seconds = timed(lambda: baselines.llamacpp(problem, bench.infos, ftype, bench.model_info,
                                                                   fallback=fallback))
            bench.score(allocation, quantizer, family, f"{ftype}{'' if fallback else ' (plain)'}", None, seconds)
    for ties, suffix in ((True, ""), (False, " untied")):
        trace_problem = problem_of(bench.profile("hessian_trace", quantizer), ties=ties)
        for target in targets:
            allocation, seconds = timed(lambda: baselines.hawq_v3(trace_problem, Budgets(max_avg_bits=target)))
            bench.score(allocation, quantizer, f"HAWQ-V3 (trace ILP{suffix})", f"HAWQ-V3 @{target:g}{suffix}", target, seconds)
    start = time.perf_counter()
    scores = nncf_scores(bench.model.module, bench.units.weights, batches=bench.calibration.batches(4))
    score_seconds = time.perf_counter() - start
    for target in targets:
        if target < bits["int4_g128"]:
            continue  # NNCF's primary precision is 4-bit, its backup 8-bit
        allocation, seconds = timed(lambda: baselines.nncf_ratio(problem, bench.infos, scores, "int4_g128", "int8_g128",
                                                                 target_avg_bits=target, criterion="max_activation_variance"))
        bench.score(allocation, quantizer, "NNCF ratio (int4/int8)", f"NNCF @{target:g}", target, seconds + score_seconds)


RUNTIMES = {"fused": "runtimes that fuse q/k/v and gate/up (vLLM)",
            "apart": "runtimes that store every tensor apart (llama.cpp, transformers)"}


def goal_rows(bench: Bench, band: tuple[float, float]) -> list[dict]:
    """For every baseline point in the band: bitalloc's headline at the same bits, and the best
    bitalloc allocation of at most those bits; the goal is a KL at least 30 % lower.

    Both sides must run on the same runtime. Where fused units must share a format, only
    allocations that keep them together compete (llama.cpp's mixes, which give attn_v its
    own type, cannot run there); where tensors are stored apart, every allocation does.
    """
    rows = []
    for runtime in RUNTIMES:
        for base in bench.points:
            if (base.family.startswith(("bitalloc", "accuracy")) or not band[0] <= base.kl <= band[1]
                    or runtime == "fused" and not base.tied):
                continue
            ours = [p for p in bench.points if p.quantizer == base.quantizer and p.family.startswith("bitalloc")
                    and p.avg_bits <= base.avg_bits + 1e-9 and (p.tied or runtime == "apart")]
            rows += goal_row(runtime, base, ours)
    return rows


def goal_row(runtime: str, base: Point, ours: list[Point]) -> list[dict]:
    """The comparison of one baseline point with bitalloc's points that may stand against it."""
    headline = [p for p in ours if p.family == (HEADLINE if runtime == "fused" else HEADLINE_UNTIED)]
    if not headline:
        return []
    head = min(headline, key=lambda p: (-p.avg_bits, p.kl))  # the headline point closest below B
    best = min(ours, key=lambda p: p.kl)
    return [{"runtime": runtime, "quantizer": base.quantizer, "baseline": base.label, "family": base.family,
             "bits": base.avg_bits, "baseline_kl": base.kl, "headline_bits": head.avg_bits, "headline_kl": head.kl,
             "headline_ratio": head.kl / base.kl, "best": best.label, "best_kl": best.kl,
             "best_ratio": best.kl / base.kl, "holds": best.kl <= 0.7 * base.kl}]


def plot(points: list[Point], path: Path) -> None:
    """KL (log) against average bits, one line per method and quantizer."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quantizers = sorted({p.quantizer for p in points}, key=["rtn", "gptq"].index)
    fig, axes = plt.subplots(1, len(quantizers), figsize=(8 * len(quantizers), 6), squeeze=False)
    families = sorted({p.family for p in points})
    colours = {family: plt.cm.tab20(i % 20) for i, family in enumerate(families)} | {HEADLINE: "black", HEADLINE_UNTIED: "dimgrey"}
    for ax, quantizer in zip(axes[0], quantizers):
        for family in families:
            mine = sorted((p for p in points if p.quantizer == quantizer and p.family == family), key=lambda p: p.avg_bits)
            if not mine:
                continue
            # Uniform points of different group sizes are not one curve: markers only.
            style = "none" if family == "uniform" else "-" if family.startswith("bitalloc") else ":"
            ax.plot([p.avg_bits for p in mine], [max(p.kl, 1e-5) for p in mine], linestyle=style, marker="o",
                    markersize=5 if family == "uniform" else 3, color=colours[family],
                    linewidth=2.5 if family in (HEADLINE, HEADLINE_UNTIED) else 1.2, label=family)
        ax.set_yscale("log")
        ax.set_xlabel("average bits per weight")
        ax.set_ylabel("KL from the 16-bit model (evaluation split)")
        ax.set_title(f"SmolLM2-135M, {quantizer.upper()}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def print_tables(result: dict) -> None:
    for quantizer in result["quantizers"]:
        print(f"\n{quantizer.upper()}: {result['eval_tokens']} evaluation tokens "
              f"(reference perplexity {result['reference_perplexity']:.2f})")
        print(f"{'family':<40}{'allocation':<36}{'bits':>7}{'KL':>9}{'ppl':>9}{'top-1':>7}{'sec':>8}")
        rows = sorted((p for p in result["points"] if p["quantizer"] == quantizer), key=lambda p: (p["family"], p["avg_bits"]))
        for p in rows:
            print(f"{p['family']:<40}{p['label']:<36}{p['avg_bits']:>7.3f}{p['kl']:>9.4f}{p['perplexity']:>9.2f}"
                  f"{p['top1']:>7.3f}{p['seconds']:>8.1f}")
    print(f"\nGoal: KL at least 30% below every baseline point with KL in {result['band']} (best bitalloc at <= its bits)")
    for runtime, meaning in RUNTIMES.items():
        rows = [r for r in result["goal"] if r["runtime"] == runtime]
        held = ", ".join(f"{q} {sum(r['holds'] for r in rows if r['quantizer'] == q)}/{sum(r['quantizer'] == q for r in rows)}"
                         for q in result["quantizers"])
        print(f"  {runtime}: {meaning}; holds {held}")
    print(f"{'runtime':<8}{'q':<5}{'baseline':<36}{'bits':>7}{'KL':>9}{'headline KL':>13}{'ratio':>7}{'best KL':>9}{'ratio':>7}  holds")
    for r in result["goal"]:
        print(f"{r['runtime']:<8}{r['quantizer']:<5}{r['baseline']:<36}{r['bits']:>7.3f}{r['baseline_kl']:>9.4f}{r['headline_kl']:>13.4f}"
              f"{r['headline_ratio']:>7.2f}{r['best_kl']:>9.4f}{r['best_ratio']:>7.2f}  {'yes' if r['holds'] else 'NO'}")
    if result["refine"]:
        print("\nMeasured refinement (fitness: KL on tuning text; judged on the evaluation split)")
        for r in result["refine"]:
            print(f"{r['quantizer']:<5}@{r['target']:<5} fitness {r['fitness_start']:.4f} -> {r['fitness_end']:.4f}   "
                  f"evaluation {r['eval_start']:.4f} -> {r['eval_end']:.4f}   {r['evaluations']} evaluations, {r['seconds']} s")
    if result["descent"]:
        print("\nMeasured descent (gradient on calibration windows, accepted by KL on fitness windows, judged on evaluation)")
        for r in result["descent"]:
            print(f"{r['quantizer']:<5}@{r['target']:<5}{'tied' if r['ties'] else 'untied':<8} fitness {r['fitness_start']:.4f} -> "
                  f"{r['fitness_end']:.4f}   evaluation {r['eval_start']:.4f} -> {r['eval_end']:.4f}   steps {r['steps']}"
                  f"  p {r.get('p_values')}  {r['seconds']} s")
    if result["kv"]:
        print("\nKV cache in the same memory budget (weights + KV at the context; KL measured on 512-token windows)")
        for r in result["kv"]:
            print(f"ctx {r['context']:>6}  memory {r['memory'] / 2**20:8.1f} MiB  {r['allocation']:<26} KV {r['kv_bytes'] / 2**20:8.1f} MiB"
                  f"  weights {r['weight_avg_bits']:5.2f} b  KL {r['kl']:.4f}  KV formats {','.join(r['kv_formats'])}")
    if result["target"]:
        print("\nAccuracy-target mode (bisection by the 95 % upper bound of KL measured on fitness windows)")
        for r in result["target"]:
            print(f"target KL {r['target_kl']:<6} -> {r['avg_bits']:.3f} bits, calibration KL {r['calibration_kl']:.4f} "
                  f"(bound {r.get('calibration_bound', r['calibration_kl']):.4f}), "
                  f"evaluation KL {r['evaluation_kl']:.4f}  {'holds' if r['holds'] else 'MISSED'}")


def arguments() -> argparse.ArgumentParser:
    """The bench's options (``bench.additivity`` builds the same bench from them)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quantizers", default="rtn,gptq", help="'' runs only the KV and target parts")
    parser.add_argument("--targets", default="3.5,4,4.5,5,5.5,6")
    parser.add_argument("--band", default="0.01,1.0", help="the KL range whose baseline points the goal covers")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--fitness-windows", type=int, default=8)
    parser.add_argument("--fitness-source", default="zoo:tuning",
                        help="text measured search scores on (speeches and a novel, like the evaluation split)")
    parser.add_argument("--trace-windows", type=int, default=4)
    parser.add_argument("--trace-tokens", type=int, default=256)
    parser.add_argument("--trace-samples", type=int, default=8)
    parser.add_argument("--refine-targets", default="4.5,5", help="RTN targets for the measured refinement ('' skips)")
    parser.add_argument("--descent-targets", default="4,4.5,5,5.5", help="targets for measured descent ('' skips)")
    parser.add_argument("--descent-quantizers", default="rtn,gptq", help="quantizers to run descent for")
    parser.add_argument("--descent-iterations", type=int, default=4)
    parser.add_argument("--descent-misses", action=argparse.BooleanOptionalAction, default=True,
                        help="also descend at the bits of every baseline point the goal misses after the targets")
    parser.add_argument("--gradient-windows", type=int, default=8, help="calibration windows for descent's gradients")
    parser.add_argument("--refine-generations", type=int, default=8)
    parser.add_argument("--refine-offspring", type=int, default=8)
    parser.add_argument("--kv-contexts", default="4096,32768", help="'' skips the KV part")
    parser.add_argument("--kv-tokens", type=int, default=256)
    parser.add_argument("--target-kls", default="0.05,0.15", help="accuracy-target mode ('' skips)")
    parser.add_argument("--target-steps", type=int, default=6)
    parser.add_argument("--weight-cache-gb", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few windows, two targets, RTN, no extras")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --out file")
    parser.add_argument("--resume", action="store_true", help="reuse the points checkpointed by an interrupted run")
    parser.add_argument("--append", action="store_true",
                        help="keep the points this run does not score again, and the parts it skips, of an existing --out file")
    parser.add_argument("--out", default=str(RESULTS / "quality.json"))
    return parser


def main() -> None:
    args = arguments().parse_args()
    if args.quick:
        args.quantizers, args.targets, args.eval_windows, args.calibration_windows = "rtn", "4.5,5", 2, 4
        args.fitness_windows, args.refine_targets, args.kv_contexts, args.target_kls = 2, "4.5", "4096", "0.15"
        args.refine_generations, args.refine_offspring, args.target_steps = 1, 2, 2
        args.descent_targets, args.descent_iterations, args.gradient_windows = "4.5", 1, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    floats = lambda text: [float(x) for x in text.split(",") if x]  # noqa: E731
    out = Path(args.out)
    if args.plot_only:
        plot([Point(**p) for p in json.loads(out.read_text())["points"]], out.with_suffix(".png"))
        return
    earlier = json.loads(out.read_text()) if args.append and out.exists() else None
    args.kv_contexts = [int(x) for x in floats(args.kv_contexts)]
    targets = floats(args.targets)
    started = time.perf_counter()
    bench = Bench(args)
    refine, descent, phases = [], [], {}
    for quantizer in filter(None, args.quantizers.split(",")):  # '' runs only the parts after them
        clock = time.perf_counter()
        run_baselines(bench, quantizer, targets)
        run_proxies(bench, quantizer, targets if quantizer == "rtn" else [])
        band = floats(args.band)
        in_band = [p for p in bench.points if p.quantizer == quantizer and not p.family.startswith("bitalloc")
                   and band[0] <= p.kl <= band[1]]
        run_headline_at(bench, quantizer, targets + [p.avg_bits for p in in_band])
        run_headline_at(bench, quantizer, targets + [p.avg_bits for p in in_band], ties=False)
        if quantizer == "rtn":
            run_nsga2(bench, quantizer, targets)
            refine += run_refine(bench, quantizer, floats(args.refine_targets))
        if quantizer in args.descent_quantizers.split(","):
            for ties in (True, False) if quantizer == "rtn" else (True,):  # untied GPTQ would pass the hour
                descent += run_descent(bench, quantizer, floats(args.descent_targets), ties=ties)
            if args.descent_misses:
                descent += run_descent_where_missed(bench, quantizer, tuple(band))
        phases[quantizer] = round(time.perf_counter() - clock, 1)
    kv = run_kv(bench) if args.kv_contexts else []
    target = run_target(bench, floats(args.target_kls))
    reference = bench.evaluator.score()  # the 16-bit model against itself: its perplexity on these windows
    if earlier is not None:
        scored = {(p.quantizer, p.label) for p in bench.points}
        bench.points[:0] = [Point(**p) for p in earlier["points"] if (p["quantizer"], p["label"]) not in scored]
        refine, kv, target = refine or earlier["refine"], kv or earlier["kv"], target or earlier["target"]
        again = {(r["quantizer"], r["target"], r["ties"]) for r in descent}
        descent = [r for r in earlier.get("descent", []) if (r["quantizer"], r["target"], r["ties"]) not in again] + descent
        phases = {**{k: v for k, v in earlier["seconds"].items() if k != "this run"}, **phases}
    quantizers = sorted({p.quantizer for p in bench.points}, key=["rtn", "gptq"].index)
    result = {
        "model": "zoo:llm (SmolLM2-135M)", "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "formats": {q: [f.name for f in formats_for(q)] for q in quantizers}, "quantizers": quantizers,
        "targets": targets, "band": floats(args.band), "calibration": bench.calibration.describe(),
        "evaluation": bench.windows.describe(), "fitness": bench.fitness.describe(), "eval_tokens": reference.tokens,
        "reference_perplexity": reference.reference_perplexity, "options": {k: v for k, v in vars(args).items() if k != "out"},
        "points": [asdict(p) for p in bench.points], "goal": goal_rows(bench, tuple(floats(args.band))),
        "refine": refine, "descent": descent, "kv": kv, "target": target,
        "seconds": {**phases, "this run": round(time.perf_counter() - started, 1)}, "resumed_points": bench.resumed,
    }
    if earlier is not None:  # the options of every run whose rows this file keeps
        result["earlier_options"] = earlier.get("earlier_options", []) + [earlier["options"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(bench.points, out.with_suffix(".png"))
    print_tables(result)
    print(f"\nwrote {out} and {out.with_suffix('.png')} in {result['seconds']['this run']} s")


if __name__ == "__main__":
    main()

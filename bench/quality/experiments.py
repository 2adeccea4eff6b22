"""The bench's experiments: every baseline, bitalloc's proxies and solvers, and the pipeline's
measured steps (descent, refinement, the accuracy target), each scored by the harness.

The measured searches run the job's own ``Step`` s on the job's own ``Workspace``: what they
score is what ``bitalloc run --descend/--refine/--measured-kl`` returns.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np

from bench.quality.harness import (
    CACHE,
    CEILING,
    CEILING_UNTIED,
    DESCENT,
    DESCENT_UNTIED,
    FORMATS,
    HEADLINE,
    HEADLINE_UNTIED,
    SURROGATE,
    SURROGATE_UNTIED,
    WIDTHS,
    Bench,
    budget_label,
    log,
    timed,
)
from bench.quality.report import goal_rows
from bitalloc.pipeline.problem import problem_of
from bitalloc.pipeline.steps import Descend, Refine, Solve, Surrogate, Target
from bitalloc.quant.costs import LatencyModel
from bitalloc.quant.evaluate import MeasuredKL
from bitalloc.quant.formats import get_format
from bitalloc.quant.kv import KVOptions
from bitalloc.quant.metrics.context import ProfilingContext
from bitalloc.quant.metrics.kv_kl import kv_errors
from bitalloc.quant.profile import Profile, cost_tables
from bitalloc.quant.sensitivity import nncf_scores
from bitalloc.quant.units import UnitSet
from bitalloc.search import Allocation, Budgets, Problem, baselines, solve

PROXIES = ("fisher_mse", "output_mse")
LLAMA_TYPES = ("Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K")
KV_FORMATS = ("int2_g128", "int4_g128", "int8_g128", "bf16")


def run_proxies(bench: Bench, quantizer: str, targets: list[float]) -> None:
    """Each metric, solved exactly (``dp``) at every target."""
    for metric in PROXIES:  # a resumed point needs no profile: it is built only for a point to score
        for target in targets:
            bench.measured(quantizer, f"bitalloc {metric}+dp", f"{metric}+dp @{target:g}", target,
                           lambda: solve(bench.problem(metric, quantizer), Budgets(max_avg_bits=target)), lambda _: {})


def run_headline_at(bench: Bench, quantizer: str, bits: list[float], ties: bool = True) -> None:
    """The headline (a job's ``Solve`` step on the ``fisher_mse`` profile) at the bits of every
    baseline point it must be compared with; ``ties=False`` for the baselines that store fused
    units apart (llama.cpp's mixes)."""
    work = bench.workspace(quantizer, ties)
    family, suffix = (HEADLINE, "") if ties else (HEADLINE_UNTIED, " untied")
    done = {p.label for p in bench.points if p.family == family and p.quantizer == quantizer}
    for b in sorted(set(bits)):
        label = f"fisher_mse+dp @{budget_label(b)}{suffix}"
        if label in done:
            continue
        done.add(label)
        allocation, seconds = timed(lambda: Solve(Budgets(max_avg_bits=b))(work, None))
        bench.score(allocation, quantizer, family, label, b, seconds)


def run_nsga2(bench: Bench, quantizer: str, targets: list[float]) -> None:
    """NSGA-II (pymoo) on the headline proxy at each target: the heuristic's gap, measured."""
    work = bench.workspace(quantizer)
    for target in targets:
        bench.measured(quantizer, "bitalloc fisher_mse+nsga2", f"fisher_mse+nsga2 @{target:g}", target,
                       lambda: Solve(Budgets(max_avg_bits=target), "nsga2")(work, None), lambda _: {})


def run_refine(bench: Bench, quantizer: str, targets: list[float]) -> list[dict]:
    """The job's ``Refine`` step from the headline allocation at each target, by KL on the
    fitness text (growing sample counts), judged on the evaluation split."""
    work = bench.workspace(quantizer)
    rows = []
    for target in targets:
        before = bench.latest(quantizer, HEADLINE, target)
        after = bench.measured(
            quantizer, "bitalloc fisher_mse+dp+refine", f"refine @{target:g}", target,
            lambda: Refine(bench.args.refine_generations)(work, Solve(Budgets(max_avg_bits=target))(work, None)),
            lambda found: {"fitness_start": found.info["start_measured"], "fitness_end": found.measured,
                           "evaluations": found.info["evaluations"]})
        rows.append({"quantizer": quantizer, "target": target, "fitness_start": after.info["fitness_start"],
                     "fitness_end": after.info["fitness_end"], "eval_start": before.kl, "eval_end": after.kl,
                     "seconds": after.seconds, "evaluations": after.info["evaluations"]})
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
    misses = {(r["bits"], r["runtime"] == "fused") for r in goal_rows(bench.points, band)
              if r["quantizer"] == quantizer and not r["holds"]}
    for bits, ties in sorted(misses):
        family = DESCENT if ties else DESCENT_UNTIED
        if any(p.quantizer == quantizer and p.family == family and bits - 0.01 <= p.target <= bits + 1e-9
               for p in bench.points):
            continue
        rows.append(descend_at(bench, quantizer, bits, ties))
    return rows


def descend_at(bench: Bench, quantizer: str, bits: float, ties: bool) -> dict:
    """The job's ``Descend`` step from the headline allocation at ``bits`` (scored there
    before). Returns its row of the descent table."""
    family, start_family = (DESCENT, HEADLINE) if ties else (DESCENT_UNTIED, HEADLINE_UNTIED)
    work = bench.workspace(quantizer, ties)
    before = bench.latest(quantizer, start_family, bits)

    def info(found: Allocation) -> dict:
        iterations = found.info["iterations"]
        return {"fitness_start": found.info["start_measured"], "fitness_end": found.measured,
                "steps": [it.get("accepted") for it in iterations], "p_values": [it.get("p_value") for it in iterations]}

    after = bench.measured(
        quantizer, family, f"descent @{budget_label(bits)}{'' if ties else ' untied'}", bits,
        lambda: Descend(bench.args.descent_iterations)(work, Solve(Budgets(max_avg_bits=bits))(work, None)), info)
    return {"quantizer": quantizer, "target": bits, "ties": ties, "fitness_start": after.info["fitness_start"],
            "fitness_end": after.info["fitness_end"], "eval_start": before.kl, "eval_end": after.kl,
            "steps": after.info["steps"], "p_values": after.info.get("p_values"), "seconds": after.seconds}


def run_surrogate(bench: Bench, quantizer: str, targets: list[float], ties: bool, ceiling: bool) -> list[dict]:
    """The job's ``Surrogate`` step from the headline allocation at each target (fitness on the
    tuning text, half to select and half to confirm), and, with ``ceiling``, the same step
    selecting and confirming on the evaluation split itself: an oracle no job may use, which
    says how low an allocation of these formats can go. Each row holds both against HAWQ-V3 at
    the same target and tie setting."""
    args, suffix = bench.args, "" if ties else " untied"
    work = bench.workspace(quantizer, ties)
    oracle = replace(work, spec=replace(work.spec, fitness_windows=len(bench.windows.inputs)))
    oracle.hessians = work.hessians
    oracle.fitness = Twice(MeasuredKL(bench.evaluator, method=quantizer, hessians=work.hessians))  # type: ignore[assignment]
    step = Surrogate(args.surrogate_rounds, args.surrogate_initial)
    rows = []
    for target in targets:
        label = budget_label(target)
        start = bench.latest(quantizer, HEADLINE if ties else HEADLINE_UNTIED, target)
        hawq = next(p for p in bench.points if p.quantizer == quantizer and p.label == f"HAWQ-V3 @{target:g}{suffix}")
        row = {"quantizer": quantizer, "target": target, "ties": ties, "start_kl": start.kl, "hawq_kl": hawq.kl,
               "hawq_bits": hawq.avg_bits}
        runs = [("surrogate", SURROGATE if ties else SURROGATE_UNTIED, work, step)]
        # the oracle keeps the lowest mean it measured over the whole evaluation split: the
        # confirmation guards a job against noise on windows it is not judged on
        runs += [("ceiling", CEILING if ties else CEILING_UNTIED, oracle, replace(step, confidence=None, patience=step.rounds))] if ceiling else []
        budgets = Budgets(max_avg_bits=target)
        for name, family, space, search in runs:
            at = space.with_budgets(budgets)  # the surrogate may use all of the target, as a job's does
            point = bench.measured(quantizer, family, f"{name} @{label}{suffix}", target,
                                   lambda: search(at, Solve(budgets)(at, None)), surrogate_info)
            row[name] = {"kl": point.kl, "bits": point.avg_bits, "ratio_to_hawq": point.kl / hawq.kl,
                         "seconds": point.seconds, **point.info}
        rows.append(row)
        log(f"  {quantizer} @{target:g}{suffix}: start {start.kl:.4f}  HAWQ-V3 {hawq.kl:.4f}  "
            + "  ".join(f"{name} {row[name]['kl']:.4f} ({row[name]['ratio_to_hawq']:.2f}x)" for name, *_ in runs))
    return rows


class Twice:
    """A measure whose every window comes twice (``w0, w0, w1, w1, ...``): the surrogate selects on
    the even windows and confirms on the odd ones, so the oracle selects and confirms on the whole
    evaluation split, the very windows it is judged on."""

    def __init__(self, measure: MeasuredKL) -> None:
        self.measure = measure

    def __call__(self, allocation: Allocation, samples: int) -> np.ndarray:
        return np.repeat(self.measure(allocation, samples), 2)


def surrogate_info(found: Allocation) -> dict:
    """What a surrogate point records: its fitness before and after, how many allocations it
    measured, whether the confirmation windows agreed, and its model's held-out accuracy."""
    return {"fitness_start": found.info["start_measured"], "fitness_end": found.measured,
            "evaluations": found.info["evaluations"], "rounds": len(found.info["rounds"]),
            "confirmed": found.info["confirmed"], "confirm_p_value": found.info["confirm_p_value"],
            "held_out": found.info.get("held_out"), "phase_seconds": found.info["seconds"]}


def run_target(bench: Bench, targets: list[float]) -> list[dict]:
    """The job's ``Target`` step (accuracy-target mode): the smallest allocation whose KL,
    measured window by window on the fitness text at the search's bisection steps, meets the
    target with 95 % confidence; then its KL on the evaluation split."""
    work = bench.workspace("rtn")
    rows = []
    for target in targets:
        point = bench.measured("rtn", "accuracy target", f"KL <= {target:g}", None,  # type: ignore[arg-type]
                               lambda: Target(target)(work, None),
                               lambda found: {"fitness_kl": found.measured, "fitness_bound": found.info["measured_bound"]})
        rows.append({"target_kl": target, "avg_bits": point.avg_bits, "fitness_kl": point.info.get("fitness_kl"),
                     "fitness_bound": point.info.get("fitness_bound"), "evaluation_kl": point.kl,
                     "holds": point.kl <= target, "seconds": point.seconds})
    return rows


def kv_problem(bench: Bench, context: int) -> tuple[Problem, UnitSet]:
    """Weights (the headline RTN profile) and every layer's K and V cache in one problem,
    costed at ``context`` tokens for one sequence; KV cells are measured KL (``kv_kl``) in
    ``KV_FORMATS`` only, a subset a job's profile (every format for every unit) cannot pick."""
    units = bench.model.units(kv_cache=True)
    weights = bench.profile("fisher_mse", "rtn")
    names = list(FORMATS) + ["bf16"]
    formats = [get_format(n) for n in names]
    caches = [u for u in units.units if u.kind != "weight"]
    path = CACHE / f"kv-{weights.meta['key'][:16]}-{bench.args.kv_tokens}.npy"  # the key covers model and calibration
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


def pair_for(target: float, bits: dict[str, float]) -> tuple[str, str] | None:
    """The adjacent widths (g128) around ``target``: the low one fits it, the high one does not."""
    for low, high in zip(WIDTHS, WIDTHS[1:]):
        if bits[low] <= target < bits[high]:
            return low, high
    return None


def run_baselines(bench: Bench, quantizer: str, targets: list[float]) -> None:
    """Every baseline of ``search.baselines``, scored like bitalloc's own allocations."""
    problem = bench.problem("fisher_mse", quantizer)  # baselines choose formats by rule; bytes are exact
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
        trace_problem = bench.problem("hessian_trace", quantizer, ties=ties)
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


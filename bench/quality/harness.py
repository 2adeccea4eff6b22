"""The bench's harness: the reference model, its token sets and profiles, one ``Workspace`` per
quantizer (the one a job would build), and the scoring of every allocation on the held-out
evaluation split, checkpointed so that an interrupted or repeated run resumes.

Profiles come from the library's ``ProfileCache`` (on disk under ``CACHE``) and measured search
from the pipeline's own steps: the bench measures what a job does, never a copy of it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from bitalloc.pipeline.baselines import model_info, unit_infos
from bitalloc.pipeline.problem import problem_of
from bitalloc.pipeline.spec import JobSpec
from bitalloc.pipeline.steps import Workspace
from bitalloc.quant.calibration import calibration_tokens, evaluation_tokens
from bitalloc.quant.evaluate import Evaluator
from bitalloc.quant.formats import Format, get_format
from bitalloc.quant.loading import LoadedModel, load_model
from bitalloc.quant.profile import Profile, ProfileCache
from bitalloc.quant.simulation import QuantizedWeights
from bitalloc.search import Allocation, Problem

RESULTS = Path(__file__).resolve().parent.parent / "results"
CACHE = Path.home() / ".cache" / "bitalloc" / "bench" / "quality"
FORMATS = ("int2_g128", "int3_g128", "int4_g128", "int5_g128", "int6_g128", "int8_g128",
           "int3_g64", "int4_g64", "int5_g64", "int3_g32", "int4_g32", "int3_g128_asym", "int4_g128_asym")
WIDTHS = ("int2_g128", "int3_g128", "int4_g128", "int5_g128", "int6_g128", "int8_g128")
HEADLINE = "bitalloc fisher_mse+dp"
HEADLINE_UNTIED = "bitalloc fisher_mse+dp (untied)"
DESCENT = "bitalloc fisher_mse+dp+descent"
DESCENT_UNTIED = "bitalloc fisher_mse+dp+descent (untied)"
SURROGATE = "bitalloc fisher_mse+dp+surrogate"
SURROGATE_UNTIED = "bitalloc fisher_mse+dp+surrogate (untied)"
# The surrogate selecting on the evaluation split itself: how low any allocation of these formats
# can go, never a job's result (so it is neither bitalloc's nor a baseline in the goal).
CEILING = "ceiling: surrogate on the evaluation split"
CEILING_UNTIED = "ceiling: surrogate on the evaluation split (untied)"


def formats_for(quantizer: str) -> list[Format]:
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
    """The model, its units, the token sets, the profiles and the workspaces every experiment shares."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.model: LoadedModel = load_model("zoo:llm")
        self.units = self.model.units()
        tokenizer = self.model.tokenizer
        self.calibration = calibration_tokens(tokenizer, "zoo:calibration", seq_len=args.seq_len,
                                              count=args.calibration_windows, seed=0)
        self.windows = evaluation_tokens(tokenizer, "zoo:evaluation", seq_len=args.seq_len, max_windows=args.eval_windows)
        self.cache = QuantizedWeights(args.weight_cache_gb * 1e9)  # each quantized cell once, for every evaluator
        self.evaluator = Evaluator(self.model, self.windows)
        self.evaluator.weights = self.cache
        self.profiles = ProfileCache(CACHE)
        self.infos = unit_infos(self.units.units)
        self.model_info = model_info(self.units.units)
        self._profiles: dict[tuple[str, str], Profile] = {}
        self._workspaces: dict[tuple[str, bool], Workspace] = {}
        self.points: list[Point] = []
        # Every scored point is checkpointed; --resume reuses them instead of evaluating again.
        self.checkpoint = Path(args.out).with_suffix(".points.json")
        self.done: dict[tuple[str, str], Point] = {}
        self.resumed = 0  # points taken from the checkpoint instead of evaluated again
        self.rescored: list[dict] = []  # resumable points of --rescore families, measured again
        if args.resume:
            self.done = {(p.quantizer, p.label): p for p in resumable(args)}

    def spec(self, quantizer: str) -> JobSpec:
        """The job this bench's measured search runs as: the reference model, these formats and
        windows, the default fitness text (the tuning split, never the evaluation split)."""
        args = self.args
        return JobSpec(model="zoo:llm", formats=[f.name for f in formats_for(quantizer)], method=quantizer,  # type: ignore[arg-type]
                       seq_len=args.seq_len, samples=args.calibration_windows, fitness_windows=args.fitness_windows,
                       gradient_windows=args.gradient_windows, eval_windows=args.eval_windows)

    def profile(self, metric: str, quantizer: str) -> Profile:
        """The weight profile for ``metric`` by ``quantizer``, from the cache when built before.
        HAWQ's traces are taken on a few calibration windows, as HAWQ does."""
        if (metric, quantizer) not in self._profiles:
            options = self.trace_options() if metric == "hessian_trace" else None
            start = time.perf_counter()
            profile, cached = self.profiles.get_or_build(self.model, self.units, formats_for(quantizer), metric,
                                                         self.calibration, method=quantizer, options=options,
                                                         progress=printing_progress)
            log(f"profile {metric} ({quantizer}): {'cached' if cached else 'built'} in {time.perf_counter() - start:.0f} s")
            self._profiles[metric, quantizer] = profile
        return self._profiles[metric, quantizer]

    def trace_options(self) -> dict:
        args = self.args
        return {"hutchinson_samples": args.trace_samples, "hutchinson_windows": args.trace_windows,
                "hutchinson_tokens": args.trace_tokens}

    def problem(self, metric: str, quantizer: str, ties: bool = True) -> Problem:
        return problem_of(self.profile(metric, quantizer), ties=ties)

    def workspace(self, quantizer: str, ties: bool = True) -> Workspace:
        """What a job's measured steps share, on the headline profile (``fisher_mse``), tied or
        not; the untied one shares the tied one's Hessians and fitness windows."""
        if (quantizer, ties) not in self._workspaces:
            self._workspaces[quantizer, ties] = (
                Workspace(self.spec(quantizer), self.model, self.units, self.calibration,
                          self.problem("fisher_mse", quantizer), CACHE, log, weights=self.cache,
                          trace_options=self.trace_options()) if ties
                else self.workspace(quantizer).with_problem(self.problem("fisher_mse", quantizer, ties=False)))
        return self._workspaces[quantizer, ties]

    def hessians_for(self, quantizer: str) -> dict | None:
        """GPTQ's calibration Hessians (None for RTN): evaluating a GPTQ allocation needs them."""
        return self.workspace(quantizer).hessians

    def latest(self, quantizer: str, family: str, target: float) -> Point:
        """The last point scored for a method at a target: where a measured search started."""
        return next(p for p in reversed(self.points) if p.quantizer == quantizer and p.family == family and p.target == target)

    def resume(self, quantizer: str, label: str) -> Point | None:
        """The checkpointed point (its allocation is not searched again: that is the expensive
        part), or None when it must be scored; points of ``--rescore`` families are never resumed."""
        point = self.done.get((quantizer, label))
        if point is None or point.family in self.args.rescore:
            return None
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
        before = self.done.get((quantizer, label))
        if before is not None:
            self.rescored.append({"quantizer": quantizer, "label": label, "avg_bits": point.avg_bits,
                                  "avg_bits_before": before.avg_bits, "kl": point.kl, "kl_before": before.kl})
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        kept = {**self.done, **{(p.quantizer, p.label): p for p in self.points}}  # never lose resumable points
        self.checkpoint.write_text(json.dumps([asdict(p) for p in kept.values()], indent=0))
        log(f"  {quantizer:<5}{label:<40}{point.avg_bits:>7.3f} b  KL {point.kl:.4f}  ppl {point.perplexity:.2f}")
        return point

    def measured(self, quantizer: str, family: str, label: str, target: float, search: Callable[[], Allocation],
                 info: Callable[[Allocation], dict]) -> Point:
        """A measured search's point: the checkpointed one, or ``search`` run, timed and scored
        with ``info`` of its result."""
        point = self.resume(quantizer, label)
        if point is not None:
            return point
        allocation, seconds = timed(search)
        return self.score(allocation, quantizer, family, label, target, seconds, info(allocation))


def resumable(args: argparse.Namespace) -> list[Point]:
    """The points a resumed run may reuse: the checkpoint of an interrupted run, else the
    points of the result file itself."""
    checkpoint, out = Path(args.out).with_suffix(".points.json"), Path(args.out)
    if checkpoint.exists():
        return [Point(**p) for p in json.loads(checkpoint.read_text())]
    if out.exists():
        return [Point(**p) for p in json.loads(out.read_text())["points"]]
    return []


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


def arguments() -> argparse.ArgumentParser:
    """The bench's options (``bench.additivity`` builds the same bench from them)."""
    parser = argparse.ArgumentParser(description="Search quality on the reference LM: bitalloc's allocations "
                                                 "against the ones users would otherwise pick.")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quantizers", default="rtn,gptq", help="'' runs only the KV and target parts")
    parser.add_argument("--targets", default="3.5,4,4.5,5,5.5,6")
    parser.add_argument("--band", default="0.01,1.0", help="the KL range whose baseline points the goal covers")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calibration-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--fitness-windows", type=int, default=8,
                        help="windows of the job's fitness text (the tuning split) measured search scores on")
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
    parser.add_argument("--surrogate-targets", default="4,4.5,5,5.5", help="targets for the surrogate ('' skips)")
    parser.add_argument("--surrogate-quantizers", default="rtn,gptq", help="quantizers to run the surrogate for")
    parser.add_argument("--surrogate-ties", default="tied,untied", help="tie settings to run the surrogate with")
    parser.add_argument("--surrogate-initial", type=int, default=16, help="allocations measured before the first fit")
    parser.add_argument("--surrogate-rounds", type=int, default=8, help="at most this many solve-and-measure rounds")
    parser.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                        help="also run the surrogate on the evaluation split (the oracle ceiling)")
    parser.add_argument("--kv-contexts", default="4096,32768", help="'' skips the KV part")
    parser.add_argument("--kv-tokens", type=int, default=256)
    parser.add_argument("--target-kls", default="0.05,0.15", help="accuracy-target mode ('' skips)")
    parser.add_argument("--weight-cache-gb", type=float, default=8.0)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few windows, two targets, RTN, no extras")
    parser.add_argument("--plot-only", action="store_true", help="redraw the PNG from an existing --out file")
    parser.add_argument("--resume", action="store_true",
                        help="reuse the points checkpointed by an interrupted run, else those of the --out file")
    parser.add_argument("--rescore", type=lambda text: [f for f in text.split(",") if f], default=[],
                        help="families (comma-separated, e.g. 'bitalloc fisher_mse+dp') scored anew even when resumed, "
                             "and compared with the resumed figures: a check that they reproduce")
    parser.add_argument("--append", action="store_true",
                        help="keep the points this run does not score again, and the parts it skips, of an existing --out file")
    parser.add_argument("--out", default=str(RESULTS / "quality.json"))
    return parser

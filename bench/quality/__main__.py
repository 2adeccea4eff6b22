"""``python -m bench.quality``: score every method, check the goal, write the JSON and the plot."""

from __future__ import annotations

import json
import platform
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.quality.experiments import (
    run_baselines,
    run_descent,
    run_descent_where_missed,
    run_headline_at,
    run_kv,
    run_nsga2,
    run_proxies,
    run_refine,
    run_surrogate,
    run_target,
)
from bench.quality.harness import Bench, Point, arguments, formats_for
from bench.quality.report import goal_rows, plot, print_rescored, print_tables


def main() -> None:
    parser = arguments()
    parser.prog = "python -m bench.quality"
    args = parser.parse_args()
    if args.quick:
        args.quantizers, args.targets, args.eval_windows, args.calibration_windows = "rtn", "4.5,5", 2, 4
        args.fitness_windows, args.refine_targets, args.kv_contexts, args.target_kls = 2, "4.5", "4096", "0.15"
        args.refine_generations = 1
        args.descent_targets, args.descent_iterations, args.gradient_windows = "4.5", 1, 2
        args.surrogate_targets, args.surrogate_initial, args.surrogate_rounds = "4.5", 4, 1
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
    refine, descent, surrogate, phases = [], [], [], {}
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
        if quantizer in args.surrogate_quantizers.split(","):
            for ties in filter(None, args.surrogate_ties.split(",")):
                surrogate += run_surrogate(bench, quantizer, floats(args.surrogate_targets), ties == "tied", args.ceiling)
        phases[quantizer] = round(time.perf_counter() - clock, 1)
    kv = run_kv(bench) if args.kv_contexts else []
    target = run_target(bench, floats(args.target_kls)) if args.target_kls else []
    reference = bench.evaluator.evaluate({})  # the 16-bit model against itself: its perplexity on these windows
    if earlier is not None:
        scored = {(p.quantizer, p.label) for p in bench.points}
        bench.points[:0] = [Point(**p) for p in earlier["points"] if (p["quantizer"], p["label"]) not in scored]
        refine, kv, target = refine or earlier["refine"], kv or earlier["kv"], target or earlier["target"]
        again = {(r["quantizer"], r["target"], r["ties"]) for r in descent}
        descent = [r for r in earlier.get("descent", []) if (r["quantizer"], r["target"], r["ties"]) not in again] + descent
        again = {(r["quantizer"], r["target"], r["ties"]) for r in surrogate}
        surrogate = [r for r in earlier.get("surrogate", []) if (r["quantizer"], r["target"], r["ties"]) not in again] + surrogate
        phases = {**{k: v for k, v in earlier["seconds"].items() if k != "this run"}, **phases}
    fitness = bench.workspace("rtn").fitness.evaluator.windows.describe()
    quantizers = sorted({p.quantizer for p in bench.points}, key=["rtn", "gptq"].index)
    result = {
        "model": "zoo:llm (SmolLM2-135M)", "machine": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "formats": {q: [f.name for f in formats_for(q)] for q in quantizers}, "quantizers": quantizers,
        "targets": targets, "band": floats(args.band), "calibration": bench.calibration.describe(),
        "evaluation": bench.windows.describe(), "fitness": fitness, "eval_tokens": reference.tokens,
        "reference_perplexity": reference.reference_perplexity, "options": {k: v for k, v in vars(args).items() if k != "out"},
        "points": [asdict(p) for p in bench.points], "goal": goal_rows(bench.points, tuple(floats(args.band))),
        "refine": refine, "descent": descent, "surrogate": surrogate, "kv": kv, "target": target,
        "seconds": {**phases, "this run": round(time.perf_counter() - started, 1)}, "resumed_points": bench.resumed,
        "rescored": bench.rescored,
    }
    if earlier is not None:  # the options of every run whose rows this file keeps
        result["earlier_options"] = earlier.get("earlier_options", []) + [earlier["options"]]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    plot(bench.points, out.with_suffix(".png"))
    print_tables(result)
    print_rescored(bench.rescored)
    print(f"\nwrote {out} and {out.with_suffix('.png')} in {result['seconds']['this run']} s")


if __name__ == "__main__":
    main()

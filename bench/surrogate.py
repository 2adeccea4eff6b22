"""The measured interaction surrogate on the reference LM: from the exact optimum of the
``fisher_mse`` profile, with HAWQ-V3's allocation as a seed, against both, on the held-out
evaluation split.

For each target (average bits), quantizer and tie setting it scores the solved start
(``fisher_mse`` + ``dp``), HAWQ-V3's trace ILP, and the ``surrogate`` search from the start
(the job's own step: fitness on the tuning split's windows, half to select, half to confirm;
never the evaluation split), with the number of measured allocations, the model's held-out error and Spearman, and
the wall time. The bench (model, windows, profiles, traces) is ``bench.quality``'s, so the
figures compare with its table.

    python -m bench.surrogate [--threads 2] [--targets 4.5] [--quantizers rtn] [--surrogate-rounds 8]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from bench.quality.harness import RESULTS, Bench, arguments, log, timed
from bitalloc.pipeline.steps import Solve, Surrogate
from bitalloc.search import Allocation, Budgets, baselines


def run(bench: Bench, quantizer: str, target: float, ties: bool) -> dict:
    """One budget: the start, HAWQ-V3 and the job's ``Surrogate`` step, each scored on the evaluation split."""
    args = bench.args
    work = bench.workspace(quantizer, ties)
    budgets = Budgets(max_avg_bits=target)
    start = Solve(budgets)(work, None)
    hawq = Allocation.of(work.problem, baselines.hawq_v3(work.trace_problem, budgets).choice, solver="hawq_v3")
    hessians = work.hessians
    found, seconds = timed(lambda: Surrogate(args.surrogate_rounds, args.surrogate_initial)(work, start))

    def kl(allocation: Allocation) -> float:
        return bench.evaluator.evaluate(allocation.formats, method=quantizer, hessians=hessians, units=bench.units).kl  # type: ignore[arg-type]

    row = {"quantizer": quantizer, "target": target, "ties": ties, "start_bits": round(start.avg_bits, 4),
           "hawq_bits": round(hawq.avg_bits, 4), "surrogate_bits": round(found.avg_bits, 4),
           "start_kl": kl(start), "hawq_kl": kl(hawq), "surrogate_kl": kl(found) if found.choice != start.choice else None,
           "fitness_start": found.info["start_measured"], "fitness_end": found.measured,
           "evaluations": found.info["evaluations"], "confirmed": found.info["confirmed"],
           "confirm_p_value": found.info["confirm_p_value"], "held_out": found.info.get("held_out"),
           "rounds": found.info["rounds"], "seconds": round(seconds, 1), "phase_seconds": found.info["seconds"]}
    if row["surrogate_kl"] is None:
        row["surrogate_kl"] = row["start_kl"]
    row["ratio_to_hawq"] = row["surrogate_kl"] / row["hawq_kl"]
    log(f"  {quantizer} @{target:g} {'tied' if ties else 'untied'}: start {row['start_kl']:.4f}  HAWQ-V3 "
        f"{row['hawq_kl']:.4f}  surrogate {row['surrogate_kl']:.4f} ({row['evaluations']} measured, {seconds:.0f} s)")
    return row


def main() -> None:
    parser = arguments()
    parser.description = __doc__.splitlines()[0]
    parser.set_defaults(targets="4.5", quantizers="rtn", eval_windows=8, out=str(RESULTS / "surrogate.json"))
    parser.add_argument("--untied", action="store_true", help="also run without tie groups")
    parser.add_argument("--surrogate-initial", type=int, default=24, help="allocations measured before the first fit")
    parser.add_argument("--surrogate-rounds", type=int, default=8, help="at most this many solve-and-measure rounds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    bench = Bench(args)
    rows = [run(bench, quantizer, float(target), ties)
            for quantizer in args.quantizers.split(",") for target in args.targets.split(",")
            for ties in ((True, False) if args.untied else (True,))]
    result = {"model": "zoo:llm (SmolLM2-135M)", "threads": torch.get_num_threads(),
              "options": {k: v for k, v in vars(args).items() if k != "out"},
              "evaluation": bench.windows.describe(), "fitness": bench.workspace("rtn").fitness.evaluator.windows.describe(), "rows": rows,
              "seconds": round(time.perf_counter() - started, 1)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'quantizer':<10}{'bits':>6}{'ties':>7}{'start KL':>10}{'HAWQ-V3':>10}{'surrogate':>11}{'/HAWQ':>7}"
          f"{'measured':>10}{'spearman':>10}{'seconds':>9}")
    for r in rows:
        spearman = (r["held_out"] or {}).get("spearman", float("nan"))
        print(f"{r['quantizer']:<10}{r['target']:>6g}{str(r['ties']):>7}{r['start_kl']:>10.4f}{r['hawq_kl']:>10.4f}"
              f"{r['surrogate_kl']:>11.4f}{r['ratio_to_hawq']:>7.2f}{r['evaluations']:>10}{spearman:>10.2f}{r['seconds']:>9.0f}")
    print(f"\nwrote {out} in {result['seconds']} s")


if __name__ == "__main__":
    main()

"""Do the profile's per-unit KL predictions add up to the model's KL?

``fisher_mse`` predicts, cell by cell, the KL that quantizing one unit alone causes, and the
exact solver minimises their sum. Were the sum the model's KL up to one factor for every
allocation, the sum's optimum would be the model's. This bench measures the KL of
allocations of four kinds (uniform widths, two-width mixes by whole layers, HAWQ-V3's trace
ILP, and the exact optimum of the sum itself) on the profile's own calibration text and on
the evaluation split, and divides it by the predicted sum. A ratio that is higher for the
sum's own optimum than for allocations chosen without the sum is the solver exploiting
what the sum cannot see: units that interact once quantized together.

Builds the same bench as ``bench.quality`` (its profiles are cached on disk, so after a
``bench.quality`` run this takes minutes). Prints a table, writes
``bench/results/additivity.json``.

    python -m bench.additivity [--threads 2] [--targets 4,4.5,5,5.5,6] [--eval-windows 8]
"""

from __future__ import annotations

import json
import sys

import numpy as np
import torch
from scipy.stats import spearmanr

from bench.quality.experiments import pair_for
from bench.quality.harness import RESULTS, WIDTHS, Bench, arguments
from bitalloc.pipeline.steps import Solve
from bitalloc.quant.evaluate import Evaluator
from bitalloc.search import Allocation, Budgets, baselines


def allocations(bench: Bench, targets: list[float]) -> list[tuple[str, str, Allocation]]:
    """(family, label, allocation) for every allocation measured, each on the headline profile's cells."""
    work = bench.workspace("rtn")
    problem = work.problem
    trace_problem = bench.problem("hessian_trace", "rtn")
    if trace_problem.unit_names != problem.unit_names or trace_problem.format_names != problem.format_names:
        raise SystemExit("the hessian_trace and fisher_mse profiles cover different cells: rebuild them")
    bits = {name: baselines.uniform(problem, name).avg_bits for name in WIDTHS}
    chosen = [("uniform", f"uniform {name}", baselines.uniform(problem, name)) for name in WIDTHS[1:]]  # int2 breaks it
    for target in targets:
        pair = pair_for(target, bits)
        if pair is not None:
            chosen.append(("two-width by layers", f"layers {pair[0]}/{pair[1]} @{target:g}",
                           baselines.layer_mix(problem, bench.infos, *pair, target)))
        hawq = baselines.hawq_v3(trace_problem, Budgets(max_avg_bits=target))
        chosen.append(("HAWQ-V3", f"HAWQ-V3 @{target:g}", Allocation.of(problem, hawq.choice)))
        chosen.append(("sum's optimum (fisher_mse+dp)", f"fisher_mse+dp @{target:g}",
                       Solve(Budgets(max_avg_bits=target))(work, None)))
    return chosen


def main() -> None:
    parser = arguments()
    parser.description = __doc__.splitlines()[0]
    parser.set_defaults(targets="4,4.5,5,5.5,6", eval_windows=8, out=str(RESULTS / "additivity.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    targets = [float(x) for x in args.targets.split(",") if x]
    bench = Bench(args)
    # the profile's own text: the first calibration windows, those descent's gradients come from
    on_calibration = Evaluator(bench.model, bench.calibration.head(args.gradient_windows), batch_size=2)
    on_calibration.weights = bench.cache
    rows = []
    for family, label, allocation in allocations(bench, targets):
        calibration = on_calibration.evaluate(allocation.formats, method="rtn").kl
        evaluation = bench.evaluator.evaluate(allocation.formats, method="rtn").kl
        rows.append({"family": family, "label": label, "avg_bits": round(allocation.avg_bits, 4),
                     "predicted": allocation.error, "calibration_kl": calibration, "evaluation_kl": evaluation,
                     "calibration_ratio": calibration / allocation.error, "evaluation_ratio": evaluation / allocation.error})
        print(f"  {label:<38}{allocation.avg_bits:6.3f} b  predicted {allocation.error:.4f}  "
              f"calibration {calibration:.4f}  evaluation {evaluation:.4f}", file=sys.stderr, flush=True)
    families: dict[str, dict] = {}
    for family in dict.fromkeys(r["family"] for r in rows):
        ratios = [r["calibration_ratio"] for r in rows if r["family"] == family]
        families[family] = {"allocations": len(ratios), "mean_ratio": float(np.mean(ratios)),
                            "min_ratio": float(np.min(ratios)), "max_ratio": float(np.max(ratios))}
    rho = spearmanr([r["predicted"] for r in rows], [r["calibration_kl"] for r in rows]).statistic
    result = {"model": "zoo:llm (SmolLM2-135M)", "metric": "fisher_mse", "method": "rtn", "targets": targets,
              "calibration": on_calibration.windows.describe(), "evaluation": bench.windows.describe(),
              "rows": rows, "families": families, "spearman_predicted_vs_calibration_kl": float(rho)}
    with open(args.out, "w") as out:
        out.write(json.dumps(result, indent=1) + "\n")
    print(f"{'allocation':<38}{'bits':>7}{'predicted':>11}{'KL calib':>10}{'KL eval':>9}{'calib/pred':>11}")
    for r in rows:
        print(f"{r['label']:<38}{r['avg_bits']:7.3f}{r['predicted']:11.4f}{r['calibration_kl']:10.4f}"
              f"{r['evaluation_kl']:9.4f}{r['calibration_ratio']:11.2f}")
    print("\nmeasured / predicted on calibration text, by family")
    for family, f in families.items():
        print(f"  {family:<32} mean {f['mean_ratio']:.2f}  range {f['min_ratio']:.2f}-{f['max_ratio']:.2f}  ({f['allocations']})")
    print(f"Spearman (predicted sum, measured KL) over every allocation: {rho:.3f}\nwrote {args.out}")


if __name__ == "__main__":
    main()

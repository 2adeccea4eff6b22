"""Benchmark the search solvers on problems the size of real models.

Problems are synthetic but shaped like the real thing: the linear layers of
Llama-3-8B (224 units) and Llama-3-70B (560 units) with their true shapes, 12
formats whose bytes include scale/zero-point overhead, errors falling about
4x per extra bit with per-unit sensitivities spread over orders of magnitude,
and a roofline latency. Seeded, so runs compare.

Measures the time of one solve per solver, of a 64-point front, and the gap
of the heuristics to the exact optimum. Prints a table and writes
bench/results/solvers.json.

    python bench/solvers.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np

from bitalloc.search import Budgets, Front, Problem, get_solver

# name, bits per element, group size (0: one scale per output channel, None: no scale), overhead bytes per group, error multiplier
FORMATS = [
    ("int2_g64_asym", 2, 64, 4, 0.8),
    ("int2_g128_asym", 2, 128, 4, 1.0),
    ("int3_g64_asym", 3, 64, 4, 0.8),
    ("int3_g128", 3, 128, 2, 1.1),
    ("int4_g64", 4, 64, 2, 0.85),
    ("int4_g128", 4, 128, 2, 1.0),
    ("nf4_g64", 4, 64, 2, 0.7),
    ("fp4_e2m1_g32", 4, 32, 1, 0.9),
    ("fp6_e3m2", 6, 0, 2, 1.3),
    ("int8", 8, 0, 2, 1.2),
    ("fp8_e4m3", 8, 0, 2, 1.5),
    ("bf16", 16, None, 0, 0.0),
]

MODELS = {
    # layers, hidden, kv width, intermediate
    "llama3-8b": (32, 4096, 1024, 14336),
    "llama3-70b": (80, 8192, 1024, 28672),
}


def synthetic_problem(model: str, seed: int = 0) -> Problem:
    """A model-sized problem (see the module docstring)."""
    layers, hidden, kv, inter = MODELS[model]
    rng = np.random.default_rng(seed)
    shapes = {"q_proj": (hidden, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, hidden),
              "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    kind_sensitivity = {"q_proj": 0.5, "k_proj": 0.7, "v_proj": 2.0, "o_proj": 1.0, "gate_proj": 0.8, "up_proj": 0.8, "down_proj": 2.5}
    names, out_features, numel, sensitivity = [], [], [], []
    for layer in range(layers):
        edge = 1 + 8 * math.exp(-layer / 2) + 4 * math.exp(-(layers - 1 - layer) / 2)  # first and last layers matter more
        for kind, (rows, cols) in shapes.items():
            names.append(f"model.layers.{layer}.{'self_attn' if kind[0] in 'qkvo' else 'mlp'}.{kind}")
            out_features.append(rows)
            numel.append(rows * cols)
            sensitivity.append(edge * kind_sensitivity[kind] * rng.lognormal(0.0, 1.5) * rows * cols)
    numel_a, out_a, sens = np.array(numel), np.array(out_features), np.array(sensitivity)
    n_bytes = np.empty((len(names), len(FORMATS)), dtype=np.int64)
    error = np.empty(n_bytes.shape)
    for f, (_, bits, group, overhead, quality) in enumerate(FORMATS):
        scales = 0 if group is None else (out_a if group == 0 else numel_a // group)
        n_bytes[:, f] = numel_a * bits // 8 + scales * overhead
        error[:, f] = sens * quality * 4.0 ** (-bits) * rng.lognormal(0.0, 0.2, len(names))
    latency = n_bytes / 3.35e6 + numel_a[:, None] * np.array([0 if g is None else 2e-12 for _, _, g, _, _ in FORMATS])  # ms at 3.35 TB/s + dequant
    return Problem(error=error, bytes=n_bytes, latency=latency, numel=numel_a, unit_names=names, format_names=[f[0] for f in FORMATS])


BUDGETS_BITS = (2.5, 3.0, 4.25, 6.0)
FRONT_POINTS = 64


def timed(call):
    start = time.perf_counter()
    result = call()
    return result, time.perf_counter() - start


def excess(found: float, optimum: float) -> float:
    """Relative error above the optimum (0 = optimal)."""
    return found / optimum - 1.0 if optimum > 0 else float(found > optimum)


def bench_model(model: str, quick: bool) -> dict:
    problem = synthetic_problem(model)
    budgets = BUDGETS_BITS[:2] if quick else BUDGETS_BITS
    heuristics = {
        "greedy": {},
        "nsga2": {"generations": 50 if quick else 200},
        "optuna": {"n_trials": 20 if quick else 100},
        "refine": {"evaluator": lambda a, samples: a.error, "generations": 10 if quick else 50},
    }
    solves = {name: [] for name in ("dp", "ilp", *heuristics)}
    for bits in budgets:
        budget = Budgets(max_avg_bits=bits)
        exact, seconds = timed(lambda: get_solver("dp").solve(problem, budget))
        solves["dp"].append({"avg_bits": bits, "seconds": seconds, "excess": 0.0, "optimal": exact.info["optimal"]})
        ilp, seconds = timed(lambda: get_solver("ilp").solve(problem, budget))
        solves["ilp"].append({"avg_bits": bits, "seconds": seconds, "excess": excess(ilp.error, exact.error), "optimal": ilp.info["optimal"]})
        for name, options in heuristics.items():
            found, seconds = timed(lambda: get_solver(name, **options).solve(problem, budget))
            solves[name].append({"avg_bits": bits, "seconds": seconds, "excess": excess(found.error, exact.error)})

    fronts = {}
    dp = get_solver("dp")
    dp_front, seconds = timed(lambda: dp.front(problem, points=FRONT_POINTS))
    fronts["dp"] = {"seconds": seconds, "points": len(dp_front), "optimal": all(a.info["optimal"] for a in dp_front)}
    front_solvers = {"greedy": {}, "nsga2": {"generations": 50 if quick else 200}}
    if not quick:
        front_solvers["ilp"] = {}
    for name, options in front_solvers.items():
        found, seconds = timed(lambda: get_solver(name, **options).front(problem, points=FRONT_POINTS))
        # The exact optimum at each found point's own size: the gap, and (with the
        # dp points) an exact front on the same budgets for the hypervolume ratio.
        optima = [dp.solve(problem, Budgets(max_bytes=a.bytes)) for a in found]
        gaps = [excess(a.error, o.error) for a, o in zip(found, optima)]
        reference_front = Front.of([*dp_front, *optima], ("error", "bytes"))
        reference = np.vstack([reference_front.points(), found.points()]).max(axis=0) * 1.01
        fronts[name] = {
            "seconds": seconds,
            "points": len(found),
            "hypervolume_ratio": found.hypervolume(reference) / reference_front.hypervolume(reference),
            "mean_excess": float(np.mean(gaps)),
            "median_excess": float(np.median(gaps)),
            "max_excess": float(np.max(gaps)),
        }
    return {"units": problem.n_units, "formats": problem.n_formats, "solve": solves, "front": fronts}


def print_table(results: dict) -> None:
    for model, result in results["models"].items():
        print(f"\n{model}: {result['units']} units x {result['formats']} formats")
        print(f"{'solver':<8} {'solve s (mean/max)':>19} {'error excess vs optimum (mean/max)':>36}   (optuna, refine start at dp's answer)")
        for name, rows in result["solve"].items():
            seconds = [r["seconds"] for r in rows]
            gaps = [r["excess"] for r in rows]
            print(f"{name:<8} {np.mean(seconds):>9.3f} /{max(seconds):>7.3f} {np.mean(gaps):>17.3%} /{max(gaps):>8.3%}")
        print(f"{'front':<8} {'seconds':>9} {'points':>7} {'hypervolume/exact':>18} {'excess at own size mean/median/max':>36}")
        for name, row in result["front"].items():
            if name == "dp":
                print(f"{name:<8} {row['seconds']:>9.3f} {row['points']:>7} {'1 (exact)':>18} {'0 (all proven optimal: ' + str(row['optimal']) + ')':>36}")
            else:
                gaps = f"{row['mean_excess']:.3%} / {row['median_excess']:.3%} / {row['max_excess']:.3%}"
                print(f"{name:<8} {row['seconds']:>9.3f} {row['points']:>7} {row['hypervolume_ratio']:>18.6f} {gaps:>36}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer budgets and generations (a smoke run)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "solvers.json")
    args = parser.parse_args()
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    results = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "budgets_avg_bits": list(BUDGETS_BITS[:2] if args.quick else BUDGETS_BITS),
        "front_points": FRONT_POINTS,
        "models": {model: bench_model(model, args.quick) for model in MODELS},
    }
    print_table(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

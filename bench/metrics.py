"""How well each sensitivity proxy ranks the real damage, on the real SmolLM2-135M.

Every weight unit x {int2,int3,int4,int8}_g128 (RTN) gets each proxy of ``quant.metrics`` and
the measured ``kl`` (KL of the next-token distribution when that unit alone is quantized).
The table gives the Spearman rank correlation of each proxy with the measured KL over all
cells and within each format (the within-format ranking is the one a solver's trade-offs
between units rest on), and the seconds each metric took. The KV caches' measured KL
(``kv_kl``, every layer's K and V cache x the same widths) is summarised too.

The int4_g32_asym and int8_g32_asym grids are left out on purpose: SmolLM2's weights were
converted from a GGUF file that lies on them, so those cells are lossless and say nothing.

Token budgets (defaults; every one is an option) fit a 2-core CPU in under 30 minutes
(24 on one thread of a shared machine, ``--threads 1``; most of it the 1080 KL passes):
proxies on 4 calibration windows of 256 tokens (Hutchinson on the first 2 of them, 12
Rademacher vectors), the measured KL (weights and caches) on the first 128 tokens, one
model pass per cell. Prints the table and writes ``bench/results/metrics.json``.

    python -m bench.metrics [--threads 1] [--windows 4] [--seq-len 256] [--kl-tokens 128]
                              [--hutchinson-windows 2] [--hutchinson-samples 12]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

from bitalloc.quant.calibration import CalibrationSet, calibration_tokens
from bitalloc.quant.formats import get_format
from bitalloc.quant.loading import load_model
from bitalloc.quant.metrics import METRICS
from bitalloc.quant.metrics.context import ProfilingContext
from bitalloc.quant.metrics.kv_kl import kv_errors
from bitalloc.quant.units import enumerate_units, kv_units

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = ("int2_g128", "int3_g128", "int4_g128", "int8_g128")
PROXIES = ("output_mse", "fisher", "hessian_trace")


def printing_progress(done: int, total: int, phase: str) -> None:
    """One line per tenth of a phase, to stderr, so a 30-minute run shows it is alive."""
    if done == total or done % max(total // 10, 1) == 0:
        print(f"  {phase}: {done}/{total}", file=sys.stderr, flush=True)


def rank_agreement(proxy: np.ndarray, truth: np.ndarray) -> dict:
    """Spearman's rho of a proxy with the measured KL over all cells and within each format column."""
    within = {fmt: float(spearmanr(proxy[:, j], truth[:, j]).statistic) for j, fmt in enumerate(FORMATS)}
    return {"all": float(spearmanr(proxy.ravel(), truth.ravel()).statistic), **within}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--windows", type=int, default=4, help="calibration windows for the proxies")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--kl-tokens", type=int, default=128, help="tokens each measured KL cell scores")
    parser.add_argument("--hutchinson-windows", type=int, default=2)
    parser.add_argument("--hutchinson-samples", type=int, default=12)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model = load_model("zoo:llm")
    units = enumerate_units(model.module, example_inputs=model.example_inputs)
    formats = [get_format(name) for name in FORMATS]
    calibration = calibration_tokens(model.tokenizer, "zoo:calibration", seq_len=args.seq_len, count=args.windows, seed=0)
    hutchinson_set = calibration.head(args.hutchinson_windows)
    options = {"kl_tokens": args.kl_tokens, "hutchinson_samples": args.hutchinson_samples}

    def context(data: CalibrationSet = calibration) -> ProfilingContext:
        return ProfilingContext(model, units, formats, data, batch_size=args.windows, progress=printing_progress,
                                options=options)

    errors: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {}
    for name in (*PROXIES, "kl"):
        print(f"{name} ...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        errors[name] = METRICS[name](context(hutchinson_set if name == "hessian_trace" else calibration))
        seconds[name] = round(time.perf_counter() - start, 1)

    print("kv_kl ...", file=sys.stderr, flush=True)
    caches = kv_units(model.module)
    start = time.perf_counter()
    kv = kv_errors(context(), caches)
    seconds["kv_kl"] = round(time.perf_counter() - start, 1)

    truth = errors["kl"]
    negative_traces = int((errors["hessian_trace"][:, 0] < 0).sum())  # a cell's sign is its unit's trace's
    agreement = {name: rank_agreement(errors[name], truth) for name in PROXIES}
    keys = np.array([u.kind == "kv_key" for u in caches])
    kv_summary = {fmt: {"key_mean_kl": float(kv[keys, j].mean()), "value_mean_kl": float(kv[~keys, j].mean()),
                        "layers_key_worse": int((kv[keys, j] > kv[~keys, j]).sum())}
                  for j, fmt in enumerate(FORMATS)}
    result = {
        "model": "zoo:llm (SmolLM2-135M)", "formats": list(FORMATS), "method": "rtn",
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "calibration": calibration.describe(), "kl_tokens": args.kl_tokens,
        "hutchinson": {"windows": args.hutchinson_windows, "samples": args.hutchinson_samples,
                       "negative_traces": negative_traces},
        "seconds": seconds, "spearman_vs_kl": agreement, "kv_kl": kv_summary,
        "units": [u.name for u in units.weights], "errors": {k: v.tolist() for k, v in errors.items()},
        "kv_units": [u.name for u in caches], "kv_errors": kv.tolist(),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "metrics.json").write_text(json.dumps(result, indent=1) + "\n")

    print(f"SmolLM2-135M, {len(units.weights)} weight units x {len(FORMATS)} formats (RTN), "
          f"{torch.get_num_threads()} threads; proxies on {args.windows}x{args.seq_len} calibration tokens "
          f"(Hutchinson: {args.hutchinson_windows} windows x {args.hutchinson_samples} vectors), "
          f"measured KL on {args.kl_tokens} tokens")
    print(f"{'Spearman vs KL':<16}{'all':>7}" + "".join(f"{f:>11}" for f in FORMATS) + f"{'seconds':>10}")
    for name in PROXIES:
        row = agreement[name]
        print(f"{name:<16}{row['all']:>7.3f}" + "".join(f"{row[f]:>11.3f}" for f in FORMATS) + f"{seconds[name]:>10.1f}")
    print(f"{'kl (measured)':<16}{'':>7}" + "".join(f"{np.median(truth[:, j]):>11.2e}" for j in range(len(FORMATS)))
          + f"{seconds['kl']:>10.1f}   (median KL per format)")
    print(f"Hutchinson traces below zero: {negative_traces} of {len(units.weights)} units")
    print(f"{'kv_kl':<16}{'':>7}" + "".join(f"{f:>11}" for f in FORMATS) + f"{seconds['kv_kl']:>10.1f}")
    for which in ("key", "value"):
        print(f"{'  mean ' + which:<16}{'':>7}" + "".join(f"{kv_summary[f][which + '_mean_kl']:>11.2e}" for f in FORMATS))
    print(f"{'  layers K > V':<16}{'':>7}" + "".join(f"{kv_summary[f]['layers_key_worse']:>11d}" for f in FORMATS)
          + f"   (of {int(keys.sum())})")


if __name__ == "__main__":
    main()

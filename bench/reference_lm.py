"""Figures of the reference assets: SmolLM2-135M's held-out perplexity and forward throughput
on this machine, the GGUF-grid check, a uniform-4-bit sanity point, the digits CNN's accuracy
and the build times. Prints a table and writes ``bench/results/reference_lm.json``.

    python bench/reference_lm.py [--seq-len 512] [--windows 0 (all)] [--threads N]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from bitalloc.quant.calibration import evaluation_tokens
from bitalloc.quant.evaluate import Evaluator, uniform
from bitalloc.quant.loading import load_model
from bitalloc.quant.units import enumerate_units
from bitalloc.quant.zoo import build, manifest

RESULTS = Path(__file__).resolve().parent / "results"


def perplexity_and_throughput(module: torch.nn.Module, windows: torch.Tensor, batch_size: int) -> tuple[float, int, float]:
    """Next-token perplexity over every window, tokens scored, and forward tokens per second.

    One pass does both: the throughput is that of the whole evaluation (after a warm-up batch).
    """
    nll, scored = 0.0, 0
    with torch.no_grad():
        module(windows[:batch_size], use_cache=False)
        start = time.perf_counter()
        for batch in windows.split(batch_size):
            logits = module(batch, use_cache=False).logits[:, :-1].float()
            nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum"))
            scored += batch[:, 1:].numel()
        seconds = time.perf_counter() - start
    return math.exp(nll / scored), scored, windows.numel() / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--windows", type=int, default=0, help="evaluation windows (0: the whole split)")
    parser.add_argument("--uniform-windows", type=int, default=64, help="windows for the uniform-format checks")
    parser.add_argument("--batch-size", type=int, default=4)
    args = parser.parse_args()

    manifests = build(log=lambda _l: None)
    model = load_model("zoo:llm")
    windows = evaluation_tokens(model.tokenizer, "zoo:evaluation", seq_len=args.seq_len, max_windows=args.windows or None)
    perplexity, scored, tokens_per_second = perplexity_and_throughput(model.module, windows.inputs, args.batch_size)

    units = enumerate_units(model.module)
    subset = Evaluator(model, evaluation_tokens(model.tokenizer, "zoo:evaluation", seq_len=args.seq_len,
                                                max_windows=args.uniform_windows), batch_size=args.batch_size)
    uniform_points = {}
    for name in ("int4_g32_asym", "int8_g32_asym", "int4_g128", "int5_g128", "int6_g128", "int8_g128"):
        uniform_points[name] = subset.evaluate(uniform(units.weights, name), units=units).to_dict()

    figures = {
        "threads": torch.get_num_threads(),
        "evaluation": {**windows.describe(), "perplexity": perplexity, "tokens_scored": scored},
        "forward_tokens_per_second": round(tokens_per_second, 1),
        "uniform_rtn": uniform_points,
        "build_seconds": {name: m["build_seconds"] for name, m in manifests.items()},
        "gguf_grid_relative_max_error": manifest("llm")["grid_relative_max_error"],
        "digits_cnn_test_accuracy": manifest("cnn")["test_accuracy"],
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "reference_lm.json").write_text(json.dumps(figures, indent=2) + "\n")

    print(f"SmolLM2-135M held-out perplexity: {perplexity:.3f} "
          f"({windows.inputs.shape[0]} windows x {args.seq_len} tokens of the evaluation split, {scored} scored)")
    print(f"forward throughput: {tokens_per_second:.0f} tokens/s on {torch.get_num_threads()} threads (batch {args.batch_size})")
    print(f"{'uniform RTN':<16}{'avg bits':>9}{'ppl':>9}{'KL':>9}{'top-1':>7}   ({args.uniform_windows} windows)")
    for name, e in uniform_points.items():
        print(f"{name:<16}{e['avg_bits']:>9.3f}{e['perplexity']:>9.3f}{e['kl']:>9.4f}{e['top1']:>7.3f}")
    print(f"build seconds: {figures['build_seconds']}; digits CNN test accuracy {figures['digits_cnn_test_accuracy']}")
    print(f"GGUF grid check (relative max weight change): {figures['gguf_grid_relative_max_error']}")


if __name__ == "__main__":
    main()

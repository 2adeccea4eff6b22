"""The same job on every pretrained model given: does each family run as its own runtime runs it?

For each model (``--models``, any spec ``bitalloc run`` takes: a local checkpoint folder, a
``.gguf``, ``zoo:llm``), it records the tokenizer's window prefix (BOS or nothing), the
unquantized held-out perplexity with and without BOS (a model trained to see BOS first is far
worse without it), the sliding-window layers its config declares, and the whole job (``fisher_mse``
profile, exact solve at ``--avg-bits``, held-out evaluation): wall time, peak RSS and the chosen
point's KL. Prints a table and writes ``bench/results/families.json``.

    python -m bench.families [--models zoo:llm,/path/to/model] [--avg-bits 5] [--eval-windows 16]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from bitalloc.pipeline import JobSpec, run_job
from bitalloc.quant.calibration import evaluation_tokens, sequence_prefix
from bitalloc.quant.loading import load_model
from bitalloc.quant.units import attention_windows
from bitalloc.search import Budgets

RESULTS = Path(__file__).resolve().parent / "results"
FORMATS = ["int3_g128", "int4_g128", "int5_g128", "int6_g128", "int8_g128"]


def perplexity(module: torch.nn.Module, windows: torch.Tensor, skip: int) -> float:
    """Perplexity of the text tokens: positions after the first ``skip`` (the prefix) are predicted."""
    nll, scored = 0.0, 0
    with torch.no_grad():
        for batch in windows.split(4):
            logits = module(batch, use_cache=False).logits[:, skip:-1].float()
            targets = batch[:, skip + 1:]
            nll += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum"))
            scored += targets.numel()
    return math.exp(nll / scored)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def family(spec: str, args: argparse.Namespace) -> dict:
    model = load_model(spec)
    tokenizer, config = model.tokenizer, getattr(model.module, "config", None)
    prefix = sequence_prefix(tokenizer)
    bos = tokenizer.bos_token_id
    # The same text tokens scored both ways: windows of seq_len - 1 text tokens, BOS in front or not.
    with_bos = evaluation_tokens(tokenizer, args.evaluation, seq_len=args.seq_len, max_windows=args.eval_windows,
                                 bos=True) if bos is not None else None
    without = evaluation_tokens(tokenizer, args.evaluation, seq_len=args.seq_len - 1, max_windows=args.eval_windows,
                                bos=False)
    layers = getattr(config, "num_hidden_layers", 0) or 0
    windows = attention_windows(config, layers) if config is not None else []
    row = {
        "model": spec, "architecture": type(model.module).__name__,
        "parameters": sum(p.numel() for p in model.module.parameters()),
        "prefix": list(prefix), "adds_bos": bool(prefix),
        "perplexity_without_bos": perplexity(model.module, without.inputs, 0),
        "perplexity_with_bos": None if with_bos is None else perplexity(model.module, with_bos.inputs, 1),
        "sliding_layers": sum(w is not None for w in windows), "layers": layers,
        "sliding_window": next((w for w in windows if w is not None), None),
    }
    del model
    start = time.perf_counter()
    job = JobSpec(model=spec, formats=FORMATS, budgets=Budgets(max_avg_bits=args.avg_bits), points=8,
                  seq_len=args.seq_len, samples=args.samples, eval_windows=args.eval_windows, evaluation=args.evaluation)
    result = run_job(job, profile_dir=args.profile_dir)
    row.update({
        "job_seconds": round(time.perf_counter() - start, 1), "profile_cached": result.profile_cached,
        "chosen_avg_bits": result.chosen.avg_bits if result.chosen else None,
        "held_out_kl": result.evaluation["kl"] if result.evaluation else None,
        "held_out_perplexity": result.evaluation["perplexity"] if result.evaluation else None,
        "peak_rss_gib": round(peak_rss_gib(), 2),
    })
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="zoo:llm", help="comma-separated model specs")
    parser.add_argument("--evaluation", default="zoo:evaluation", help="held-out text source")
    parser.add_argument("--avg-bits", type=float, default=5.0)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--profile-dir", type=Path, default=Path.home() / ".cache" / "bitalloc" / "bench" / "families")
    parser.add_argument("--out", type=Path, default=RESULTS / "families.json")
    args = parser.parse_args()

    rows = []
    for spec in args.models.split(","):
        print(f"{spec} ...", file=sys.stderr, flush=True)
        rows.append(family(spec.strip(), args))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": platform.machine(), "threads": torch.get_num_threads(),
                                    "avg_bits": args.avg_bits, "formats": FORMATS, "seq_len": args.seq_len,
                                    "eval_windows": args.eval_windows, "models": rows}, indent=2) + "\n")
    header = f"{'model':<28}{'arch':<22}{'BOS':>4}{'ppl no BOS':>11}{'ppl BOS':>9}{'sliding':>8}" \
             f"{'bits':>6}{'KL':>8}{'s':>7}{'RSS GiB':>8}"
    print(header)
    for r in rows:
        with_bos = "-" if r["perplexity_with_bos"] is None else f"{r['perplexity_with_bos']:.2f}"
        print(f"{r['model'][:27]:<28}{r['architecture'][:21]:<22}{'yes' if r['adds_bos'] else 'no':>4}"
              f"{r['perplexity_without_bos']:>11.2f}{with_bos:>9}{r['sliding_layers']:>4}/{r['layers']:<3}"
              f"{r['chosen_avg_bits'] or 0:>6.2f}{r['held_out_kl'] or 0:>8.4f}{r['job_seconds']:>7.0f}"
              f"{r['peak_rss_gib']:>8.2f}")


if __name__ == "__main__":
    main()

"""Streamed profiling against model size: wall time and peak RSS of a profile (``--metric``,
``fisher_mse`` by default) of random Llama-shaped models, each streamed block by block under a
memory cap, and of a held-out evaluation of one allocation streamed the same way.

* **Models.** ``write_llama`` writes a Llama-shaped model with random bf16 weights as sharded
  safetensors, one tensor at a time (the whole model is never in memory), with the reference
  SmolLM2 tokenizer. ``SIZES`` names widths and depths near 0.1B, 0.4B and 1B parameters
  (``--sizes`` picks some; ``--depths`` scales each one's depth by several factors, for the
  same width at more depths: ``--sizes 1B --depths 0.27,1,1.64`` runs 6, 22 and 36 blocks).
* **Runs.** Each model is profiled streamed (in fp32 on the CPU) in a fresh process (``--run``),
  then the profile's exact optimum at ``--avg-bits`` is scored on ``--eval-windows`` held-out
  windows (KL from the unquantized model, both streamed); the process reports its wall times and
  peak RSS (``VmHWM``: the process doing the work, nothing else) of the profile and, reset in
  between, of the evaluation, and whether each stayed under ``--max-memory``.
* **Output.** A table, and ``bench/results/scale.json``.

    python -m bench.scale [--sizes 0.1B,0.4B,1B] [--depths 1] [--max-memory 2GiB] [--windows 2] [--seq-len 256]
                          [--metric fisher_mse] [--eval-windows 2] [--avg-bits 5] [--shards 1]
                          [--formats int4_g128,int8_g128] [--threads 1] [--workdir DIR] [--keep]
                          [--out scale.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SHARD_BYTES = 512 * 2**20


@dataclass(frozen=True)
class Shape:
    """A Llama's width and depth (grouped-query attention, SwiGLU MLP, tied embeddings)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int

    def config(self, vocab: int) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
                "hidden_size": self.hidden, "intermediate_size": self.intermediate,
                "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": True, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2}


SIZES = {
    "0.1B": Shape(768, 2048, 12, 12, 4),
    "0.4B": Shape(1024, 2816, 30, 16, 4),
    "1B": Shape(2048, 5632, 22, 32, 4),  # TinyLlama's shape
}


def write_llama(folder: Path, shape: Shape, seed: int = 0) -> int:
    """A random Llama of ``shape`` in ``folder`` (bf16 shards, index, config, tokenizer); its parameter count."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from bitalloc.quant.zoo import zoo_model_dir

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(zoo_model_dir("llm"))
    tokenizer.save_pretrained(folder)
    config = shape.config(len(tokenizer))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))
    generator = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    weight_map, size, params = {}, 0, 0
    for name, p in skeleton.named_parameters():  # tied: the output embedding is the input one
        tensor = torch.ones(p.shape) if p.dim() == 1 else torch.randn(p.shape, generator=generator) * 0.02
        shards[-1][name] = tensor.to(torch.bfloat16)
        size += p.numel() * 2
        params += p.numel()
        if size >= SHARD_BYTES:
            _flush(shards, folder, weight_map, save_file)
            size = 0
    _flush(shards, folder, weight_map, save_file)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": params * 2},
                                                                     "weight_map": weight_map}))
    return params


def _flush(shards: list[dict], folder: Path, weight_map: dict, save_file) -> None:
    if not shards[-1]:
        return
    name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
    save_file(shards[-1], folder / name, metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shards[-1], name))
    shards[-1] = {}


def peak_rss() -> int:
    """This process's peak resident set in bytes: ``VmHWM``, the high-water mark of its own memory
    map. Not ``ru_maxrss``, which after a fork and exec also counts the parent's peak (the parent
    here has just written the model)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status: peak RSS needs Linux")


def reset_peak_rss() -> None:
    """Start ``VmHWM`` again from the current resident set (Linux: ``clear_refs`` mode 5), so the
    evaluation's peak is told apart from the profile's."""
    Path("/proc/self/clear_refs").write_text("5")


def run(folder: Path, args: argparse.Namespace) -> dict:
    """Profile ``folder`` streamed in this process and score one point of it; what the parent records."""
    from bitalloc.pipeline.problem import problem_of
    from bitalloc.quant.calibration import calibration_for, evaluation_tokens
    from bitalloc.quant.device import parse_bytes
    from bitalloc.quant.evaluate import Evaluator
    from bitalloc.quant.formats import parse_formats
    from bitalloc.quant.loading import LoadPolicy
    from bitalloc.quant.profile import build_profile
    from bitalloc.quant.stream import StreamedModel, load_within
    from bitalloc.search import Budgets, solve

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model = load_within(str(folder), LoadPolicy(), dtype=torch.float32, device=torch.device("cpu"), stream=True)
    units = model.units()
    calibration = calibration_for(model, None, seq_len=args.seq_len, count=args.windows)
    profile = build_profile(model, units, parse_formats(args.formats), args.metric, calibration, shards=args.shards)
    profiled = time.perf_counter()
    profile_peak = peak_rss()
    reset_peak_rss()
    evaluation = None
    if args.eval_windows:
        chosen = solve(problem_of(profile), Budgets(max_avg_bits=args.avg_bits))
        windows = evaluation_tokens(model.tokenizer, "zoo:evaluation", seq_len=args.seq_len, max_windows=args.eval_windows)
        evaluation = Evaluator(model, windows, batch_size=2, cache_bytes=0).evaluate(chosen.formats, units=units)
    eval_peak = peak_rss() if evaluation is not None else None
    cap = parse_bytes(args.max_memory)
    return {"streamed": isinstance(model, StreamedModel), "units": len(units), "cells": int(profile.error.size),
            "seconds": round(profiled - start, 1), "eval_seconds": round(time.perf_counter() - profiled, 1),
            "eval_kl": None if evaluation is None else evaluation.kl,
            "eval_avg_bits": None if evaluation is None else evaluation.avg_bits,
            "peak_rss_mib": round(profile_peak / 2**20, 1), "under_cap": profile_peak <= cap,
            "eval_peak_rss_mib": None if eval_peak is None else round(eval_peak / 2**20, 1),
            "eval_under_cap": None if eval_peak is None else eval_peak <= cap}


def main() -> None:
    from bitalloc.quant.device import parse_bytes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES))
    parser.add_argument("--depths", default="1", help="factors each size's depth is scaled by, one model each")
    parser.add_argument("--max-memory", default="2GiB", help="the cap the profile runs under")
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--formats", default="int4_g128,int8_g128")
    parser.add_argument("--metric", default="fisher_mse", help="a metric that streams: fisher_mse, output_mse, hessian_trace")
    parser.add_argument("--eval-windows", type=int, default=2, help="held-out windows the chosen point is scored on (0: none)")
    parser.add_argument("--avg-bits", type=float, default=5.0, help="the budget of the point that is scored")
    parser.add_argument("--shards", type=int, default=1, help="block ranges the profile is measured in, one after another")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", type=Path, default=None, help="where the models are written (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the written models")
    parser.add_argument("--out", default="scale.json", help="the JSON's name under bench/results/")
    parser.add_argument("--run", type=Path, default=None, help=argparse.SUPPRESS)  # the child: profile one folder
    args = parser.parse_args()
    if args.run is not None:
        print(json.dumps(run(args.run, args)))
        return

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bitalloc-scale-"))
    rows = []
    for name, depth in [(n, float(d)) for n in args.sizes.split(",") for d in args.depths.split(",")]:
        base = SIZES[name]
        shape = Shape(base.hidden, base.intermediate, max(1, round(base.layers * depth)), base.heads, base.kv_heads)
        folder = workdir / f"{name}-{shape.layers}"
        params = write_llama(folder, shape)
        child = [sys.executable, "-m", "bench.scale", "--run", str(folder), "--max-memory", args.max_memory,
                 "--windows", str(args.windows), "--seq-len", str(args.seq_len), "--formats", args.formats,
                 "--threads", str(args.threads), "--metric", args.metric, "--eval-windows", str(args.eval_windows),
                 "--avg-bits", str(args.avg_bits), "--shards", str(args.shards)]
        done = subprocess.run(child, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            result = {"failed": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}
        else:
            result = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append({"size": name, "params": params, "bf16_mib": round(params * 2 / 2**20), **asdict(shape), **result})
        if not args.keep:
            shutil.rmtree(folder)
        print(json.dumps(rows[-1]), flush=True)
    record = {"max_memory": args.max_memory, "windows": args.windows, "seq_len": args.seq_len,
              "formats": args.formats.split(","), "threads": args.threads, "metric": args.metric,
              "eval_windows": args.eval_windows, "avg_bits": args.avg_bits, "shards": args.shards,
              "depths": args.depths.split(","), "compute": "cpu, float32", "runs": rows}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nstreamed {args.metric} profile (and a {args.eval_windows}-window evaluation) under --max-memory {args.max_memory}, {args.windows}x{args.seq_len} tokens, "
          f"{len(record['formats'])} formats, {args.threads} thread(s)")
    print(f"{'size':<6}{'params':>14}{'fp32 MiB':>10}{'x cap':>7}{'layers':>8}{'seconds':>10}{'s/Gparam':>10}"
          f"{'peak RSS MiB':>14}{'under cap':>11}{'eval s':>8}{'eval peak MiB':>15}")
    cap = parse_bytes(args.max_memory)
    for row in rows:
        per = f"{row['seconds'] / row['params'] * 1e9:.0f}" if "seconds" in row else "-"
        print(f"{row['size']:<6}{row['params']:>14,}{row['params'] * 4 // 2**20:>10}{row['params'] * 4 / cap:>7.2f}"
              f"{row['layers']:>8}{row.get('seconds', '-'):>10}{per:>10}"
              f"{row.get('peak_rss_mib', row.get('failed', '-')):>14}{str(row.get('under_cap', '-')):>11}"
              f"{row.get('eval_seconds', '-'):>8}{str(row.get('eval_peak_rss_mib', '-')):>15}")


if __name__ == "__main__":
    main()

"""Time and peak memory of profiling with ``output_mse`` through ``quant.profile.build_profile``.

* CPU: the reference SmolLM2-135M with the service's default calibration (32 windows of 512
  tokens) and a typical format list. Memory is the process's peak resident set
  (``ru_maxrss``), the model included; the model's own bytes are printed beside it.
* GPU: a Llama-3-8B-shaped model (random bf16 weights; only the shapes matter for speed)
  on CUDA, when there is a GPU; skipped with a message otherwise. Memory is the peak CUDA
  allocation. An out-of-memory stop is recorded as a result, not hidden: the input
  Hessians of an 8B model (a 14336^2 matrix per ``down_proj``) are most of the bill.

Each run also reports how the time splits between the calibration pass (``hessians``)
and the cells (``output_mse``). Prints a table and writes ``bench/results/profile_speed.json``.

    python -m bench.profile_speed [--threads N] [--windows 32] [--seq-len 512] [--formats a,b,...]
                                    [--gpu-windows 16] [--gpu-include GLOB] [--skip-gpu]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import torch

from bitalloc.quant.calibration import CalibrationSet, calibration_tokens
from bitalloc.quant.formats import parse_formats
from bitalloc.quant.loading import LoadedModel, load_model
from bitalloc.quant.profile import build_profile
from bitalloc.quant.units import enumerate_units

RESULTS = Path(__file__).resolve().parent / "results"
CPU_FORMATS = "int2_g128,int3_g128,int4_g128,int8_g128,nf4_g64,fp8_e4m3,bf16"
GPU_FORMATS = "int2_g128,int3_g128,int4_g128,int8_g128,bf16"


class PhaseClock:
    """A progress callback that notes when each phase reports first and last."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.spans: dict[str, list[float]] = {}

    def __call__(self, _done: int, _total: int, phase: str) -> None:
        now = time.perf_counter() - self.start
        self.spans.setdefault(phase, [now, now])[1] = now

    def seconds(self) -> dict[str, float]:
        """Seconds per phase, each from the end of the phase before it."""
        result, previous = {}, 0.0
        for phase, (_first, last) in self.spans.items():
            result[phase] = round(last - previous, 2)
            previous = last
        return result


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def parameter_mib(module: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in module.parameters()) / 2**20


def profile_run(model: LoadedModel, calibration: CalibrationSet, formats: str, include: str | None) -> dict:
    units = enumerate_units(model.module, include=[include] if include else None)
    clock = PhaseClock()
    start = time.perf_counter()
    profile = build_profile(model, units, parse_formats(formats), "output_mse", calibration, progress=clock)
    return {"units": len(units), "formats": formats.split(","), "calibration_shape": list(calibration.inputs.shape),
            "seconds": round(time.perf_counter() - start, 2), "phases": clock.seconds(),
            "cells": int(profile.error.size)}


def cpu_run(args: argparse.Namespace) -> dict:
    model = load_model("zoo:llm")
    calibration = calibration_tokens(model.tokenizer, "zoo:calibration", seq_len=args.seq_len, count=args.windows, seed=0)
    rss_loaded = peak_rss_mib()
    result = profile_run(model, calibration, args.formats, None)
    return {**result, "model": "zoo:llm (SmolLM2-135M, float32)", "threads": torch.get_num_threads(),
            "machine": platform.processor() or platform.machine(), "model_mib": round(parameter_mib(model.module), 1),
            "peak_rss_mib_after_load": round(rss_loaded, 1), "peak_rss_mib": round(peak_rss_mib(), 1)}


def llama3_8b_shaped(device: str) -> LoadedModel:
    """Llama-3-8B's architecture with random bf16 weights, built directly on ``device``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                         rope_theta=500000.0)
    with torch.device(device):
        module = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    example = {"input_ids": torch.arange(2, 18, device=device)[None]}
    return LoadedModel("llama3-8b-shaped (random bf16)", module, None, example)


def gpu_run(args: argparse.Namespace) -> dict:
    model = llama3_8b_shaped("cuda")
    tokens = torch.randint(0, model.module.config.vocab_size, (args.gpu_windows, args.seq_len),
                           generator=torch.Generator().manual_seed(0)).cuda()
    calibration = CalibrationSet(tokens, "random tokens", "-")
    torch.cuda.reset_peak_memory_stats()
    base = {"model": model.spec, "device": torch.cuda.get_device_name(), "model_mib": round(parameter_mib(model.module), 1)}
    try:
        result = profile_run(model, calibration, GPU_FORMATS, args.gpu_include)
        torch.cuda.synchronize()
    except torch.cuda.OutOfMemoryError as exc:
        result = {"out_of_memory": str(exc).splitlines()[0]}
    return {**base, **result, "peak_cuda_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--formats", default=CPU_FORMATS)
    parser.add_argument("--gpu-windows", type=int, default=16)
    parser.add_argument("--gpu-include", default=None, help="glob of the units to profile on the GPU (default: all)")
    parser.add_argument("--skip-gpu", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    results = {"cpu": cpu_run(args)}
    if args.skip_gpu:
        results["gpu"] = {"skipped": "--skip-gpu"}
    elif not torch.cuda.is_available():
        results["gpu"] = {"skipped": "no CUDA device on this machine"}
    else:
        results["gpu"] = gpu_run(args)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "profile_speed.json").write_text(json.dumps(results, indent=2) + "\n")

    cpu = results["cpu"]
    print(f"{'output_mse profile':<34}{'units':>6}{'cells':>7}{'seconds':>9}  phases (s)")
    print(f"{'CPU SmolLM2-135M, ' + str(cpu['threads']) + ' threads':<34}{cpu['units']:>6}{cpu['cells']:>7}"
          f"{cpu['seconds']:>9.1f}  {cpu['phases']}")
    print(f"  calibration {cpu['calibration_shape']}, peak RSS {cpu['peak_rss_mib']:.0f} MiB "
          f"(after loading: {cpu['peak_rss_mib_after_load']:.0f} MiB; the model's weights: {cpu['model_mib']:.0f} MiB)")
    gpu = results["gpu"]
    if "skipped" in gpu:
        print(f"GPU Llama-3-8B-shaped: skipped ({gpu['skipped']})")
    elif "out_of_memory" in gpu:
        print(f"GPU Llama-3-8B-shaped on {gpu['device']}: out of memory at {gpu['peak_cuda_mib']:.0f} MiB "
              f"({gpu['out_of_memory']})")
    else:
        print(f"{'GPU ' + gpu['device']:<34}{gpu['units']:>6}{gpu['cells']:>7}{gpu['seconds']:>9.1f}  {gpu['phases']}")
        print(f"  peak CUDA memory {gpu['peak_cuda_mib']:.0f} MiB (the model's weights: {gpu['model_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()

"""What the command groups share: failing with a message, budgets from options, JSON files, the service context."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from bitalloc.search.budgets import Budgets

FORMATS_HELP = ("Comma-separated candidate formats, e.g. int3_g128,int4_g128,int5_g128,int6_g128,int8_g128, or "
                "llama.cpp's own types, e.g. q3_k,q4_k,q5_k,q6_k,q8_0 (after `bitalloc llamacpp build`).")
DEFAULT_FORMATS = "int2_g128,int3_g128,int4_g128,int5_g128,int6_g128,int8_g128"
DTYPE_HELP = "What the model runs in while it is measured: auto (bf16 on a GPU, fp32 on the CPU), fp32, bf16 or fp16."
DEVICE_HELP = ("Where the model computes: auto (the first CUDA GPU when there is one, else cpu), cpu, cuda or cuda:N. "
               "Not --hardware, the GPU latency is predicted for.")
MAX_MEMORY_HELP = ("Memory the model's weights may take on the device, in bytes or like 24GiB (default: what the device "
                   "has free); a local model whose weights do not fit is profiled block by block.")
STREAM_HELP = "Profile a local model block by block, reading each block's weights only while it runs, even if it fits."
SHARDS_HELP = ("Split a streamed profile into this many block ranges, measured one after another "
               "(the numbers do not change; each shard runs the blocks before its range forward).")
HARDWARE_HELP = ("The GPU the quantized model will be served on, whose memory bandwidth (or measured kernel "
                 "table) predicts decode latency: h100, h200, a100, l40s, rtx4090 or cpu.")


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` to stderr; the caller raises the returned exit (status 1)."""
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(1)


def budgets(avg_bits: float | None, max_bytes: int | None, latency: float | None, error: float | None) -> Budgets:
    """The options' budgets; ``typer.BadParameter`` names a bad value."""
    try:
        return Budgets(max_avg_bits=avg_bits, max_bytes=max_bytes, max_latency=latency, max_error=error)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--avg-bits/--max-bytes/--latency/--error") from exc


def write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def read_allocation(path: Path) -> dict:
    """An allocation file's ``{unit: format}``: ``alloc.json`` from solve/run, or a bare map."""
    data = json.loads(path.read_text())
    formats = data.get("formats", data) if isinstance(data, dict) else None
    if not isinstance(formats, dict):
        raise ValueError(f"{path}: expected an allocation ({{\"formats\": {{unit: format}}}}) or a {{unit: format}} map")
    return formats


def context():
    """The service context from the settings (migrated unless BITALLOC_AUTO_MIGRATE=0)."""
    from bitalloc.service.context import Context
    from bitalloc.service.settings import get_settings

    return Context.create(get_settings())

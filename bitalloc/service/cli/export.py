"""``bitalloc export``: write an allocation in a runtime's format (compressed-tensors, GPTQModel, llama.cpp, JSON)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from bitalloc.service.cli.common import fail, read_allocation


def export(
    profile: Path = typer.Option(..., help="The profile the allocation was solved on (its units and tie groups)."),
    allocation: Path = typer.Option(..., help="alloc.json from `bitalloc solve` or `bitalloc run` (or a {unit: format} map)."),
    format: str = typer.Option("json", help="json, compressed-tensors, gptqmodel or llama.cpp."),
    out: Path | None = typer.Option(None, help="File to write (default: the format's conventional file name)."),
) -> None:
    """Write the allocation as a file its runtime loads; refuse, naming each unit and why, what it cannot express."""
    from bitalloc.quant.export import EXPORTERS, export_from_profile
    from bitalloc.quant.profile import Profile

    if format not in EXPORTERS:
        raise typer.BadParameter(f"unknown format {format!r}; known: {', '.join(EXPORTERS)}", param_hint="--format")
    try:
        stored = Profile.load(profile)
        formats = read_allocation(allocation)
        exported = export_from_profile(format, stored, formats, _provenance(stored, allocation))
    except (ValueError, FileNotFoundError) as exc:  # ExportError is a ValueError: the message names each unit
        raise fail(str(exc)) from exc
    target = out or Path(exported.filename)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(exported.data)
    typer.echo(f"{format}: {len(formats)} units -> {target}")


def _provenance(profile, allocation: Path) -> dict:
    """The profile's identity and, when the file is a solved allocation, its solver and predicted totals."""
    data = json.loads(allocation.read_text())
    meta = profile.meta
    provenance = {"model": meta.get("model"), "profile": {key: meta.get(key) for key in
                  ("key", "metric", "method", "calibration", "latency_source")}, "allocation_file": allocation.name}
    if "solver" in data:
        provenance["solver"] = data["solver"]
        provenance["totals"] = {"error": data.get("error"), "latency": data.get("latency"),
                                "measured_kl": data.get("measured")}
    return provenance


def register(app: typer.Typer) -> None:
    app.command("export")(export)

"""Allocations the export tests share."""

from __future__ import annotations

from collections.abc import Sequence


def tied_allocation(units, cycle: Sequence[str]) -> dict[str, str]:
    """A format per tie group and per lone weight unit, cycling through ``cycle``; KV caches 16-bit."""
    formats, step = {}, 0
    for group in units.tie_groups:
        formats.update({name: cycle[step % len(cycle)] for name in group})
        step += 1
    for unit in units.units:
        if unit.name not in formats:
            formats[unit.name] = "bf16" if unit.kind != "weight" else cycle[step % len(cycle)]
            step += unit.kind == "weight"
    return formats

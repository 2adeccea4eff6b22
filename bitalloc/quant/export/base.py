"""What every exporter shares: the allocation it is handed, the file it returns, the error it raises.

An exporter either writes a file its runtime loads exactly as the allocation says, or refuses
with an ``ExportError`` that lists every unit it cannot express and why, all at once (a user
fixing one problem should not discover the next one only on the next try).
"""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from bitalloc.quant.formats import Format, get_format
from bitalloc.quant.kv import KVOptions
from bitalloc.quant.units import Unit


class ExportError(ValueError):
    """The target cannot express the allocation; the message names each unit/format and the reason."""


@dataclass(frozen=True)
class Export:
    """One exported file: its conventional ``filename``, ``media_type`` and bytes."""

    filename: str
    media_type: str
    data: bytes
    description: str = ""


@dataclass(frozen=True)
class ExportRequest:
    """An allocation with what an exporter needs to know about its units.

    ``formats`` maps every unit name to a parsed ``Format``; ``provenance`` is free-form JSON
    (model, profile key, metric, solver, ...) that exporters with a place for it copy along;
    ``kv`` is the context the KV units were costed at (only the byte totals use it).
    """

    units: tuple[Unit, ...]
    formats: Mapping[str, Format]
    tie_groups: tuple[tuple[str, ...], ...]
    provenance: Mapping[str, Any] = field(default_factory=dict)
    kv: KVOptions | None = None

    @property
    def weights(self) -> list[Unit]:
        return [u for u in self.units if u.kind == "weight"]

    @property
    def kv_units(self) -> list[Unit]:
        return [u for u in self.units if u.kind != "weight"]

    def format_of(self, unit: Unit) -> Format:
        return self.formats[unit.name]

    def split_tie_groups(self) -> list[tuple[tuple[str, ...], list[str]]]:
        """Tie groups whose members were given different formats, with those formats."""
        split = []
        for group in self.tie_groups:
            names = sorted({self.formats[name].name for name in group})
            if len(names) > 1:
                split.append((group, names))
        return split

    def base_format(self, candidates: Sequence[Unit]) -> Format:
        """The format covering the most elements among ``candidates``: what a base config names."""
        numel: Counter[str] = Counter()
        by_name = {}
        for unit in candidates:
            fmt = self.format_of(unit)
            numel[fmt.name] += unit.numel
            by_name[fmt.name] = fmt
        return by_name[max(sorted(numel), key=numel.__getitem__)]


class Problems:
    """Collects what a target cannot express, grouped by reason, and raises them together."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._units: dict[str, list[str]] = defaultdict(list)

    def add(self, reason: str, unit: str) -> None:
        self._units[reason].append(unit)

    def raise_if_any(self) -> None:
        if not self._units:
            return
        lines = [f"{self.target} cannot express this allocation:"]
        for reason, units in self._units.items():
            lines.append(f"- {reason}: {', '.join(units)}")
        raise ExportError("\n".join(lines))


def refuse_split_tie_groups(request: ExportRequest, problems: Problems, why: str) -> None:
    """Record each tie group whose members differ in format (``why``: what fuses them)."""
    for group, names in request.split_tie_groups():
        problems.add(f"tie group split across {', '.join(names)}: {why}", " + ".join(group))


def format_family(fmt: Format) -> str:
    """The format without its grouping: ``int4_g128_asym`` -> ``int4_asym``, ``fp4_e2m1_g64`` -> ``fp4_e2m1``."""
    return re.sub(r"_(?:g\d+|pc)", "", fmt.name)


def json_bytes(document: object) -> bytes:
    """Stable JSON (sorted keys, two-space indent, trailing newline): equal allocations hash equally."""
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class Exporter:
    """A registered export target: what it writes and the function that writes it."""

    name: str
    filename: str
    media_type: str
    description: str
    build: Callable[[ExportRequest], bytes]


def make_request(formats: Mapping[str, str], units: Sequence[Unit], tie_groups: Sequence[Sequence[str]],
                 provenance: Mapping[str, Any], kv: KVOptions | None) -> ExportRequest:
    """Check that ``formats`` covers exactly ``units`` with known format names, and parse them."""
    names = [u.name for u in units]
    missing = [n for n in names if n not in formats]
    extra = sorted(set(formats) - set(names))
    problems = []
    if missing:
        problems.append(f"units without a format: {', '.join(missing)}")
    if extra:
        problems.append(f"formats for units the model does not have: {', '.join(extra)}")
    parsed: dict[str, Format] = {}
    for name in names:
        if name in formats:
            try:
                parsed[name] = get_format(formats[name])
            except ValueError as exc:
                problems.append(f"{name}: {exc}")
    if problems:
        raise ExportError("the allocation does not match the units: " + "; ".join(problems))
    unknown_ties = sorted({n for g in tie_groups for n in g} - set(names))
    if unknown_ties:
        raise ExportError(f"tie groups name units the model does not have: {', '.join(unknown_ties)}")
    if kv is None and any(u.kind != "weight" for u in units):
        raise ValueError("KV units need the KV options (context, batch) they were costed at")
    return ExportRequest(tuple(units), parsed, tuple(tuple(g) for g in tie_groups), dict(provenance), kv)

"""Where each unit sits in the allocation heatmap, and how many bits each format costs.

The page draws blocks down and unit kinds across for any model, so the server names the
columns rather than the page guessing from Llama's module names: a unit's column is the
shortest suffix of its name that is unique within its block (``q_proj`` for Llama; GPT-2's
two ``c_proj`` become ``attn.c_proj`` and ``mlp.c_proj``). Bits per weight come from the
formats themselves, so the page needs no format parsing.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from bitalloc.quant.formats import get_format
from bitalloc.quant.profile import Profile
from bitalloc.quant.units import Unit

KV_COLUMNS = {"kv_key": "K cache", "kv_value": "V cache"}


def unique_suffixes(names: list[str]) -> dict[str, str]:
    """Each dotted name's shortest suffix that no other name in ``names`` shares."""
    parts = {name: name.split(".") for name in names}
    depth = dict.fromkeys(names, 1)
    while True:
        suffix = {name: ".".join(parts[name][-depth[name]:]) for name in names}
        counts = Counter(suffix.values())
        clashing = [n for n in names if counts[suffix[n]] > 1 and depth[n] < len(parts[n])]
        if not clashing:
            return suffix
        for name in clashing:
            depth[name] += 1


def unit_columns(units: list[Unit]) -> dict[str, str]:
    """Unit name -> heatmap column label (weights by name suffix within their block, caches as K/V)."""
    by_block: dict[int | None, list[str]] = defaultdict(list)
    for unit in units:
        if unit.kind == "weight":
            by_block[unit.block].append(unit.name)
    columns = {name: label for names in by_block.values() for name, label in unique_suffixes(names).items()}
    return {u.name: KV_COLUMNS.get(u.kind) or columns[u.name] for u in units}


def unit_rows(profile: Profile) -> list[dict[str, Any]]:
    """The profile's units, in profile order, with their heatmap column; a KV unit also with the
    tokens it caches at the profile's context (``None`` without KV units)."""
    columns = unit_columns(profile.units)
    context = (profile.meta.get("kv") or {}).get("context")
    return [{"name": u.name, "kind": u.kind, "block": u.block, "column": columns[u.name], "shape": list(u.shape),
             "numel": u.numel, "context": None if u.kind == "weight" or context is None else u.cached_tokens(context)}
            for u in profile.units]


def format_bits(profile: Profile) -> list[dict[str, Any]]:
    """Each format's code bits and its bits per weight with scales and offsets, over this model's weights
    (group overhead depends on the matrix shapes, so the figure is the one this model would pay)."""
    shapes = [u.shape for u in profile.units if u.kind == "weight"] or [u.shape for u in profile.units]
    numel = sum(n * k for n, k in shapes)
    rows = []
    for name in profile.formats:
        fmt = get_format(name)
        rows.append({"name": name, "bits": fmt.bits,
                     "bits_per_weight": 8.0 * sum(fmt.nbytes(shape) for shape in shapes) / numel})
    return rows

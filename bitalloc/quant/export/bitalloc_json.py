"""bitalloc's own configuration file: every unit with its format and exact bytes, the totals, provenance.

It is the lossless export (every format is expressible) and the one ``bitalloc build`` and
scripts read back: ``formats`` is the plain unit -> format map an allocation file has.
Provenance keys (job, point, model, profile, budgets, solver, ...) sit at the top level, as
the service's configuration download always had them; ``totals`` adds the predicted figures
the provenance carries (error, latency, measured KL) to the bytes and average bits computed
here from the formats.
"""

from __future__ import annotations

from bitalloc.quant.costs import unit_bytes
from bitalloc.quant.export.base import Exporter, ExportRequest, json_bytes

CONFIG_VERSION = 1


def build(request: ExportRequest) -> bytes:
    context, batch = (request.kv.context, request.kv.batch) if request.kv else (0, 1)
    units = []
    for unit in request.units:
        fmt = request.format_of(unit)
        row = {"name": unit.name, "kind": unit.kind, "shape": list(unit.shape), "block": unit.block,
               "format": fmt.name, "bytes": unit_bytes(unit, fmt, context=context, batch=batch)}
        if unit.kind != "weight":  # the tokens this cache holds: a sliding-window layer's window, if shorter
            row["context"] = unit.cached_tokens(context)
        units.append(row)
    total = sum(u["bytes"] for u in units)
    numel = sum(u.numel for u in request.units)
    provenance = dict(request.provenance)
    predicted = provenance.pop("totals", {})
    document = {
        **provenance,
        "bitalloc_config": CONFIG_VERSION,
        "formats": {u["name"]: u["format"] for u in units},
        "units": units,
        "tie_groups": [list(g) for g in request.tie_groups],
        "kv_cache": None if request.kv is None else {"context": request.kv.context, "batch": request.kv.batch},
        "totals": {**predicted, "bytes": total, "avg_bits": 8 * total / numel},
    }
    return json_bytes(document)


EXPORTER = Exporter(
    name="json", filename="bitalloc-config.json", media_type="application/json",
    description="bitalloc's own file: each unit's format and bytes, totals and provenance; expresses every format.",
    build=build,
)

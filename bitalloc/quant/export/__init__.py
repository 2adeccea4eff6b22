"""Exports of an allocation: files that runtimes load, one module per target.

``export_allocation(name, formats, units, tie_groups, provenance)`` returns an ``Export``
(filename, media type, bytes) or raises ``ExportError`` naming every unit and format the
target cannot express and why. ``EXPORTERS`` is the registry by name; ``list_exporters()``
describes them (the service's ``GET /v1/exports``). What each writes and refuses:
docs/exports.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from bitalloc.quant.export import bitalloc_json, compressed_tensors, gptqmodel, llama_cpp
from bitalloc.quant.export.base import Export, Exporter, ExportError, ExportRequest, make_request
from bitalloc.quant.kv import KVOptions
from bitalloc.quant.profile import Profile
from bitalloc.quant.units import Unit

EXPORTERS: dict[str, Exporter] = {e.name: e for e in (bitalloc_json.EXPORTER, compressed_tensors.EXPORTER,
                                                      gptqmodel.EXPORTER, llama_cpp.EXPORTER)}
# The names as a type, for APIs that validate them (kept equal to EXPORTERS by a test).
ExportName = Literal["json", "compressed-tensors", "gptqmodel", "llama.cpp"]


def list_exporters() -> list[dict[str, str]]:
    """Every exporter's name, filename, media type and one-line description."""
    return [{"name": e.name, "filename": e.filename, "media_type": e.media_type, "description": e.description}
            for e in EXPORTERS.values()]


def export_allocation(name: str, formats: Mapping[str, str], units: Sequence[Unit],
                      tie_groups: Sequence[Sequence[str]], provenance: Mapping[str, Any] | None = None,
                      *, kv: KVOptions | None = None) -> Export:
    """The allocation ``formats`` (unit -> format name) written by exporter ``name``.

    ``kv`` is the context the KV units were costed at; it is required when ``units`` has any.
    """
    if name not in EXPORTERS:
        raise ValueError(f"unknown export {name!r}; known: {', '.join(EXPORTERS)}")
    exporter = EXPORTERS[name]
    request = make_request(formats, units, tie_groups, provenance or {}, kv)
    return Export(exporter.filename, exporter.media_type, exporter.build(request), exporter.description)


def export_from_profile(name: str, profile: Profile, formats: Mapping[str, str],
                        provenance: Mapping[str, Any] | None = None) -> Export:
    """``export_allocation`` with the units, tie groups and KV context of the profile the allocation was solved on."""
    kv = profile.meta.get("kv")
    return export_allocation(name, formats, profile.units, profile.tie_groups, provenance,
                             kv=None if kv is None else KVOptions(**kv))


__all__ = ["EXPORTERS", "Export", "ExportError", "ExportName", "ExportRequest", "Exporter", "export_allocation",
           "export_from_profile", "list_exporters"]

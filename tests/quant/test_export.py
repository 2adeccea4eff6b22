"""The export registry, the checks every export shares, and bitalloc's own JSON file."""

from __future__ import annotations

import json
from typing import get_args

import pytest

from bitalloc.quant.costs import LatencyModel
from bitalloc.quant.export import (
    EXPORTERS,
    ExportError,
    ExportName,
    export_allocation,
    export_from_profile,
    list_exporters,
)
from bitalloc.quant.formats import get_format
from bitalloc.quant.kv import KVOptions
from bitalloc.quant.profile import Profile, cost_tables
from bitalloc.quant.units import Unit

UNITS = [Unit("model.layers.0.self_attn.q_proj", "weight", (64, 128), 0),
         Unit("model.layers.0.self_attn.k_proj", "weight", (32, 128), 0),
         Unit("model.layers.0.mlp.down_proj", "weight", (128, 256), 0)]
TIES = [["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"]]


def test_the_registry_lists_every_exporter_and_the_api_type_names_them_all():
    listed = list_exporters()
    assert [e["name"] for e in listed] == list(EXPORTERS) == list(get_args(ExportName))
    assert list(EXPORTERS) == ["json", "compressed-tensors", "gptqmodel", "llama.cpp"]
    assert all(set(e) == {"name", "filename", "media_type", "description"} and all(e.values()) for e in listed)


@pytest.mark.parametrize("name", list(EXPORTERS))
def test_every_export_refuses_an_allocation_that_does_not_match_the_units(name):
    formats = {"model.layers.0.self_attn.q_proj": "int4_g32", "model.layers.9.mlp.up_proj": "int4_g32",
               "model.layers.0.mlp.down_proj": "int7_g32"}
    with pytest.raises(ExportError) as caught:
        export_allocation(name, formats, UNITS, TIES, {})
    message = str(caught.value)
    assert "units without a format: model.layers.0.self_attn.k_proj" in message
    assert "model.layers.9.mlp.up_proj" in message and "integer widths" in message
    with pytest.raises(ValueError, match="unknown export 'onnx'"):
        export_allocation("onnx", {u.name: "int4_g32" for u in UNITS}, UNITS, TIES, {})


def test_json_carries_units_bytes_totals_and_provenance_as_the_profile_counts_them():
    kv = [Unit("kv.0.key", "kv_key", (2, 64), 0, 256), Unit("kv.0.value", "kv_value", (2, 64), 0, 256)]
    units = UNITS + kv
    formats = {UNITS[0].name: "int4_g32", UNITS[1].name: "int4_g32", UNITS[2].name: "bf16",
               "kv.0.key": "int8_pc", "kv.0.value": "int4_g32_asym"}
    provenance = {"model": "factory:tiny-llama", "job_id": "j", "point_id": 7, "solver": "dp",
                  "totals": {"error": 0.5, "latency": None, "measured_kl": None}}
    options = KVOptions(context=1024, batch=2)
    exported = export_allocation("json", formats, units, TIES, provenance, kv=options)
    assert exported.filename == "bitalloc-config.json" and exported.media_type == "application/json"
    document = json.loads(exported.data)

    names = list(formats)
    parsed = [get_format(formats[n]) for n in names]
    nbytes, _, allowed = cost_tables(units, parsed, LatencyModel("h100"), options)
    expected = {n: int(nbytes[i, i]) for i, n in enumerate(names)}  # unit i takes format i here
    assert {u["name"]: u["bytes"] for u in document["units"]} == expected
    assert document["totals"] == {"bytes": sum(expected.values()), "avg_bits": 8 * sum(expected.values()) / sum(u.numel for u in units),
                                  "error": 0.5, "latency": None, "measured_kl": None}
    assert document["formats"] == formats and document["tie_groups"] == TIES
    assert document["kv_cache"] == {"context": 1024, "batch": 2}
    assert document["model"] == "factory:tiny-llama" and document["point_id"] == 7 and document["bitalloc_config"] == 1
    assert {"name", "kind", "shape", "block", "format", "bytes"} == set(document["units"][0])


def test_kv_units_need_the_context_they_were_costed_at():
    kv = [Unit("kv.0.key", "kv_key", (2, 64), 0, 256)]
    with pytest.raises(ValueError, match="KV options"):
        export_allocation("json", {u.name: "bf16" for u in UNITS + kv}, UNITS + kv, [], {})


def test_export_from_profile_takes_units_ties_and_kv_options_from_the_profile(tmp_path):
    import numpy as np

    kv = [Unit("kv.0.key", "kv_key", (2, 64), 0, 256)]
    units = UNITS + kv
    shape = (len(units), 1)
    profile = Profile(units, ["int8_g32"], np.zeros(shape), np.zeros(shape, np.int64), np.zeros(shape),
                      np.ones(shape, bool), TIES, {"kv": {"context": 512, "batch": 1}})
    profile = Profile.load(profile.save(tmp_path / "p.npz"))
    document = json.loads(export_from_profile("json", profile, {u.name: "int8_g32" for u in units}).data)
    assert document["kv_cache"] == {"context": 512, "batch": 1} and document["tie_groups"] == TIES
    kv_bytes = next(u["bytes"] for u in document["units"] if u["name"] == "kv.0.key")
    assert kv_bytes == 512 * (2 * 64 + 2 * 64 * 2 // 32)  # per token: int8 codes + a float16 scale per 32 tokens and channel

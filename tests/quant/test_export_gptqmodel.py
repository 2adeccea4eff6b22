"""The GPTQModel export: every module resolves, through the ``dynamic`` rules, to its allocated bits and group."""

from __future__ import annotations

import json
import re

import pytest
from export_helpers import tied_allocation

from bitalloc.quant.export import ExportError, export_allocation
from bitalloc.quant.formats import get_format
from bitalloc.quant.kv import KVOptions
from bitalloc.quant.units import Unit


def dynamic_override(config: dict, module: str) -> dict | bool | None:
    """How GPTQModel (``QuantizeConfig.dynamic_get``) and vLLM (``get_dynamic_override``) read ``dynamic``:
    negative rules first (GPTQModel reorders them so), then the first rule whose regex ``re.match``-es."""
    rules = config.get("dynamic", {})
    for pattern in [p for p in rules if p.startswith("-:")] + [p for p in rules if not p.startswith("-:")]:
        if re.match(pattern.removeprefix("-:").removeprefix("+:"), module):
            return False if pattern.startswith("-:") else rules[pattern]
    return None


def resolved(config: dict, module: str) -> tuple[int, int] | None:
    """(bits, group_size) a module is quantized with, or None when it is skipped."""
    override = dynamic_override(config, module)
    if override is False:
        return None
    override = override or {}
    return override.get("bits", config["bits"]), override.get("group_size", config["group_size"])


def expected(format_name: str) -> tuple[int, int] | None:
    fmt = get_format(format_name)
    return None if fmt.is_keep else (fmt.bits, -1 if fmt.group_size is None else fmt.group_size)


def test_every_smollm2_module_and_every_vllm_fused_layer_resolves_to_its_allocation(smollm2_units):
    cycle = ["int4_g128", "int4_g128", "int8_g32", "int3_pc", "bf16", "int2_g64"]
    formats = tied_allocation(smollm2_units, cycle)
    exported = export_allocation("gptqmodel", formats, smollm2_units.units, smollm2_units.tie_groups,
                                 {"model": "zoo:llm", "point_id": 4}, kv=KVOptions())
    assert exported.filename == "quantize_config.json"
    config = json.loads(exported.data)
    assert (config["bits"], config["group_size"], config["sym"], config["desc_act"]) == (4, 128, True, False)
    assert config["quant_method"] == config["checkpoint_format"] == "gptq" and config["lm_head"] is False
    assert config["meta"]["bitalloc"] == {"model": "zoo:llm", "point_id": 4}
    for unit in smollm2_units.weights:
        assert resolved(config, unit.name) == expected(formats[unit.name]), unit.name
    for group in smollm2_units.tie_groups:  # vLLM looks up the fused module's name
        parent, _, leaf = group[0].rpartition(".")
        fused = f"{parent}.{'qkv_proj' if leaf == 'q_proj' else 'gate_up_proj'}"
        assert resolved(config, fused) == expected(formats[group[0]]), fused
    regexes = [p.removeprefix("-:").removeprefix("+:") for p in config["dynamic"]]
    assert not any(re.match(r, f"{u.name}_lora") for r in regexes for u in smollm2_units.weights)  # anchored at the end
    assert len(config["dynamic"]) < len(smollm2_units.weights)  # base-format modules need no rule


@pytest.mark.parametrize("format_name, reason", [
    ("int5_g32", "GPTQ kernels (GPTQModel's torch kernel, vLLM) run 2/3/4/8 bits"),
    ("int6_pc", "run 2/3/4/8 bits"),
    ("int4_g32_asym", "GPTQ's asymmetric grids store integer zero points"),
    ("int4_g256", "GPTQModel's kernels take groups of 16/32/64/128 or per channel"),
    ("nf4_g64", "GPTQ checkpoints hold integer codes only"),
    ("fp8_e4m3", "GPTQ checkpoints hold integer codes only"),
])
def test_inexpressible_formats_are_refused_with_the_reason(format_name, reason):
    units = [Unit("model.layers.0.mlp.down_proj", "weight", (64, 512), 0),
             Unit("model.layers.0.self_attn.o_proj", "weight", (64, 512), 0)]
    formats = {units[0].name: format_name, units[1].name: "int4_g128"}
    with pytest.raises(ExportError) as caught:
        export_allocation("gptqmodel", formats, units, [], {})
    message = str(caught.value)
    assert message.startswith("GPTQModel cannot express this allocation:\n- " + format_name)
    assert reason in message and message.endswith(": model.layers.0.mlp.down_proj")


def test_split_tie_groups_quantized_kv_and_all_16_bit_are_refused(smollm2_units):
    formats = {u.name: ("int4_g128" if u.kind == "weight" else "bf16") for u in smollm2_units.units}
    split = {**formats, "model.layers.2.mlp.up_proj": "int8_g32", "kv.3.value": "int8_g32"}
    with pytest.raises(ExportError) as caught:
        export_allocation("gptqmodel", split, smollm2_units.units, smollm2_units.tie_groups, {}, kv=KVOptions())
    message = str(caught.value)
    assert "tie group split across int4_g128, int8_g32" in message
    assert "model.layers.2.mlp.gate_proj + model.layers.2.mlp.up_proj" in message
    assert "int8_g32 KV cache: GPTQModel quantizes weights only: kv.3.value" in message
    keep = {u.name: "bf16" for u in smollm2_units.units}
    with pytest.raises(ExportError, match="every unit is 16-bit"):
        export_allocation("gptqmodel", keep, smollm2_units.units, smollm2_units.tie_groups, {}, kv=KVOptions())

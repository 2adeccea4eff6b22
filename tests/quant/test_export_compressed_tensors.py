"""The compressed-tensors export, checked with the real ``compressed_tensors`` library."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.compressors.format import infer_module_format
from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
from compressed_tensors.quantization.lifecycle.forward import fake_quantize
from compressed_tensors.quantization.utils import calculate_qparams
from compressed_tensors.utils.match import match_name
from export_helpers import tied_allocation

from bitalloc.quant.export import ExportError, export_allocation
from bitalloc.quant.export.compressed_tensors import weight_args
from bitalloc.quant.formats import get_format
from bitalloc.quant.kv import KVOptions
from bitalloc.quant.units import Unit

VLLM_FUSED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}
# SmolLM2's rows are 576 or 1536 long: these groups divide both.
CYCLE = ["int4_g64", "int8_pc", "fp8_e4m3", "int3_g32", "bf16"]


def parse(exported) -> QuantizationConfig:
    return QuantizationConfig.model_validate(json.loads(exported.data))


def groups_matching(config: QuantizationConfig, name: str, fused=None) -> list[str]:
    return [key for key, scheme in config.config_groups.items()
            if any(match_name(name, target, fused) for target in scheme.targets)]


def test_smollm2_allocation_round_trips_through_the_real_parser(smollm2_units):
    formats = tied_allocation(smollm2_units, CYCLE)
    exported = export_allocation("compressed-tensors", formats, smollm2_units.units, smollm2_units.tie_groups,
                                 {}, kv=KVOptions())
    assert exported.filename == "quantization_config.json"
    config = parse(exported)
    assert config.kv_cache_scheme is None and config.format == "mixed-precision"
    assert len(config.config_groups) == len(set(formats.values()) - {"bf16"})
    for unit in smollm2_units.weights:
        fmt = get_format(formats[unit.name])
        matched = groups_matching(config, unit.name)
        if fmt.is_keep:
            assert matched == [] and unit.name in config.ignore
            continue
        assert len(matched) == 1, unit.name
        scheme = config.config_groups[matched[0]]
        args = scheme.weights
        assert (args.num_bits, args.symmetric, args.group_size) == (fmt.bits, True, fmt.group_size)
        assert args.type == ("int" if formats[unit.name].startswith("int") else "float")
        assert args.strategy == ("channel" if fmt.group_size is None else "group")
        assert scheme.format == infer_module_format(torch.nn.Linear, scheme).value  # what llm-compressor would pick


def test_vllm_fused_layers_find_exactly_the_group_of_their_tie_group(smollm2_units):
    formats = tied_allocation(smollm2_units, CYCLE)
    config = parse(export_allocation("compressed-tensors", formats, smollm2_units.units, smollm2_units.tie_groups,
                                     {}, kv=KVOptions()))
    checked = 0
    for group in smollm2_units.tie_groups:
        parent, _, leaf = group[0].rpartition(".")
        fused = f"{parent}.{'qkv_proj' if leaf == 'q_proj' else 'gate_up_proj'}"
        matched = groups_matching(config, fused, VLLM_FUSED)
        assert matched == groups_matching(config, group[0])
        checked += 1
    assert checked == 60


@pytest.mark.parametrize("name", ["int4_g64", "int3_pc", "int8_g32", "int2_g32", "fp8_e4m3", "fp8_e4m3_g64"])
def test_the_written_args_quantize_exactly_as_bitalloc_does(name):
    """compressed-tensors' own qparams + fake_quantize on our args land on our grid (scales rounded to float16 as ours)."""
    fmt = get_format(name)
    args = QuantizationArgs.model_validate(weight_args(fmt))
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    grouped = w.reshape(16, -1, fmt.group_size or 128)
    scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    theirs = fake_quantize(w, scale.half().float(), zero_point, args)
    assert torch.equal(theirs, fmt.fake_quantize(w))


def test_asymmetric_grids_are_refused_because_an_integer_zero_point_lands_elsewhere():
    fmt = get_format("int4_g32_asym")
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(1))
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=32)
    grouped = w.reshape(8, -1, 32)
    scale, zero_point = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
    assert not torch.allclose(fake_quantize(w, scale.half().float(), zero_point, args), fmt.fake_quantize(w), atol=1e-3)

    units = [Unit("a.q_proj", "weight", (8, 64)), Unit("a.o_proj", "weight", (8, 64))]
    with pytest.raises(ExportError) as caught:
        export_allocation("compressed-tensors", {"a.q_proj": "int4_g32_asym", "a.o_proj": "int4_g32"}, units, [], {})
    assert "int4_g32_asym: compressed-tensors' asymmetric grids store an integer zero point" in str(caught.value)
    assert str(caught.value).endswith(": a.q_proj")


def test_every_inexpressible_unit_is_named_at_once_with_its_reason(smollm2_units):
    formats = {u.name: ("int8_g32" if u.kind == "weight" else "bf16") for u in smollm2_units.units}
    formats["model.layers.0.mlp.down_proj"] = "nf4_g64"
    formats["model.layers.1.mlp.down_proj"] = "fp6_e3m2"
    formats["model.layers.2.mlp.down_proj"] = "fp4_e2m1"
    formats["model.layers.3.self_attn.o_proj"] = "int4_g128"  # K = 576 = 4.5 groups of 128
    with pytest.raises(ExportError) as caught:
        export_allocation("compressed-tensors", formats, smollm2_units.units, smollm2_units.tie_groups, {},
                          kv=KVOptions())
    message = str(caught.value)
    assert message.startswith("compressed-tensors cannot express this allocation:")
    assert "nf4_g64: compressed-tensors has no NormalFloat codebook" in message
    assert "fp6_e3m2: compressed-tensors' 6-bit float is E2M3" in message
    assert "fp4_e2m1: compressed-tensors' 4-bit floats are NVFP4" in message
    assert "int4_g128: K is not a multiple of 128" in message and "model.layers.3.self_attn.o_proj (K=576)" in message
    assert len(message.splitlines()) == 5


def test_a_split_tie_group_is_refused_naming_the_group(smollm2_units):
    formats = {u.name: ("int4_g64" if u.kind == "weight" else "bf16") for u in smollm2_units.units}
    formats["model.layers.5.self_attn.v_proj"] = "int8_pc"
    with pytest.raises(ExportError) as caught:
        export_allocation("compressed-tensors", formats, smollm2_units.units, smollm2_units.tie_groups, {},
                          kv=KVOptions())
    message = str(caught.value)
    assert "tie group split across int4_g64, int8_pc: vLLM fuses them" in message
    assert ("model.layers.5.self_attn.q_proj + model.layers.5.self_attn.k_proj + model.layers.5.self_attn.v_proj"
            in message)


def test_quantized_kv_caches_are_refused_and_varied_ones_say_so(smollm2_units):
    weights = {u.name: "int8_pc" for u in smollm2_units.weights}
    kv = [u for u in smollm2_units.units if u.kind != "weight"]
    uniform = {**weights, **{u.name: "int8_g64" for u in kv}}
    with pytest.raises(ExportError, match="int8_g64 KV cache: bitalloc quantizes keys per channel and values per token"):
        export_allocation("compressed-tensors", uniform, smollm2_units.units, smollm2_units.tie_groups, {}, kv=KVOptions())
    varied = {**uniform, "kv.7.key": "int4_g64"}
    with pytest.raises(ExportError, match=r"KV formats vary by layer or by K/V \(int4_g64, int8_g64\)"):
        export_allocation("compressed-tensors", varied, smollm2_units.units, smollm2_units.tie_groups, {}, kv=KVOptions())
    keep = {u.name: "bf16" for u in smollm2_units.units}
    with pytest.raises(ExportError, match="every unit is 16-bit"):
        export_allocation("compressed-tensors", keep, smollm2_units.units, smollm2_units.tie_groups, {}, kv=KVOptions())

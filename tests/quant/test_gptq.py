"""GPTQ on the real reference LM's layers with real calibration text."""

import pytest
import torch

from bitalloc.quant.calibration import calibration_tokens
from bitalloc.quant.formats import INT_BITS, IntFormat, get_format
from bitalloc.quant.gptq import gptq_quantize, layer_error
from bitalloc.quant.hessian import collect_hessians
from bitalloc.quant.units import enumerate_units, weight_matrix

LAYERS = ("model.layers.4.self_attn.q_proj", "model.layers.17.self_attn.o_proj", "model.layers.25.mlp.down_proj")


@pytest.fixture(scope="module")
def real_layers(smollm2):
    units = enumerate_units(smollm2.module, include=list(LAYERS))
    tokens = calibration_tokens(smollm2.tokenizer, "zoo:calibration", seq_len=256, count=8, seed=0)
    hessians = collect_hessians(smollm2.module, units.units, tokens.batches(4))
    modules = dict(smollm2.module.named_modules())
    return {name: (weight_matrix(modules[name]).detach().float(), hessians[name]) for name in LAYERS}


@pytest.mark.parametrize("bits", INT_BITS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_lowers_the_layer_error_against_rtn(real_layers, bits, symmetric):
    fmt = IntFormat(bits, 128, symmetric)
    for name, (w, h) in real_layers.items():
        rtn = layer_error(w, fmt.fake_quantize(w), h)
        gptq = layer_error(w, gptq_quantize(w, h, fmt).dequantize(), h)
        assert gptq < rtn, f"{name} {fmt.name}: GPTQ {gptq:.4g} >= RTN {rtn:.4g}"


@pytest.mark.parametrize("name", ["int3_g64", "int4_pc", "int2_g32_asym"])
def test_gptq_with_act_order_and_other_groupings(real_layers, name):
    fmt = get_format(name)
    w, h = real_layers[LAYERS[0]]
    rtn = layer_error(w, fmt.fake_quantize(w), h)
    for act_order in (False, True):
        q = gptq_quantize(w, h, fmt, act_order=act_order)
        assert int(q.codes.max()) <= fmt.max_code
        assert layer_error(w, q.dequantize(), h) < rtn


def test_hessian_is_the_input_second_moment(tiny_llama):
    units = enumerate_units(tiny_llama.module, example_inputs=tiny_llama.example_inputs)
    batch = torch.arange(3, 35).reshape(2, 16)
    captured = {}
    down = dict(tiny_llama.module.named_modules())["model.layers.0.mlp.down_proj"]
    handle = down.register_forward_pre_hook(lambda _m, args: captured.setdefault("x", args[0].detach()))
    hessians = collect_hessians(tiny_llama.module, units.units, [batch], tie_groups=units.tie_groups)
    handle.remove()
    x = captured["x"].reshape(-1, captured["x"].shape[-1]).double()
    assert torch.allclose(hessians["model.layers.0.mlp.down_proj"].double(), x.T @ x, rtol=1e-5, atol=1e-6)
    q, k = hessians["model.layers.1.self_attn.q_proj"], hessians["model.layers.1.self_attn.k_proj"]
    assert q is k  # one matrix for a tie group


def test_gptq_rejects_non_integer_formats_and_bad_hessians():
    w = torch.randn(4, 8)
    with pytest.raises(TypeError, match="integer"):
        gptq_quantize(w, torch.eye(8), get_format("nf4_g64"))
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize(w, torch.eye(7), get_format("int4_g32"))

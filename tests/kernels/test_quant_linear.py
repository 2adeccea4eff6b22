"""QuantLinear and Fp8Linear: buffers that round-trip through safetensors, and the reference on CPU."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from bitalloc.kernels import reference
from bitalloc.kernels.packing import PLANES
from bitalloc.kernels.quant_linear import Fp8Linear, QuantLinear
from bitalloc.kernels.weights import Fp8Weight, PackedWeight


def random_layer(bits: int, symmetric: bool, bias: bool, group_size: int | None = 32) -> QuantLinear:
    gen = torch.Generator().manual_seed(bits)
    n, k = 6, 70
    groups = 1 if group_size is None else -(-k // group_size)
    return QuantLinear.from_codes(
        torch.randint(0, 1 << bits, (n, k), generator=gen),
        torch.rand(n, groups, generator=gen),
        None if symmetric else torch.randn(n, groups, generator=gen),
        torch.randn(n, generator=gen) if bias else None,
        bits=bits, group_size=group_size,
    )


@pytest.mark.parametrize("bits", sorted(PLANES))
@pytest.mark.parametrize("symmetric, bias", [(True, False), (False, True)])
def test_safetensors_round_trip_into_a_fresh_layer(bits, symmetric, bias, tmp_path):
    layer = random_layer(bits, symmetric, bias)
    save_file(layer.state_dict(), tmp_path / "layer.safetensors")
    fresh = QuantLinear(70, 6, bits=bits, group_size=32, symmetric=symmetric, bias=bias)
    fresh.load_state_dict(load_file(tmp_path / "layer.safetensors"))
    x = torch.randn(3, 70)
    assert torch.equal(fresh(x), layer(x))
    assert torch.equal(fresh.dequantize(), layer.dequantize())


def test_buffers_are_named_and_typed_by_the_format():
    state = random_layer(3, symmetric=False, bias=True).state_dict()
    assert {name: (t.dtype, tuple(t.shape)) for name, t in state.items()} == {
        "qweight": (torch.int32, (6, 5)),
        "qweight_hi": (torch.int32, (6, 3)),
        "scales": (torch.float16, (6, 3)),
        "offsets": (torch.float16, (6, 3)),
        "bias": (torch.float32, (6,)),
    }
    assert set(random_layer(4, symmetric=True, bias=False).state_dict()) == {"qweight", "scales"}


@pytest.mark.parametrize("group_size", [16, None])
def test_forward_and_dequantize_on_cpu_follow_the_reference(group_size):
    layer = random_layer(5, symmetric=False, bias=True, group_size=group_size)
    weight = layer.packed_weight()
    x = torch.randn(2, 3, 70).half()
    assert torch.equal(layer(x), reference.matmul(x, weight, layer.bias))
    assert torch.equal(layer.dequantize(), reference.dequantize(weight))


def test_from_codes_keeps_fp16_scales():
    codes = torch.randint(0, 16, (4, 64))
    scales = torch.rand(4, 2, dtype=torch.float64)
    layer = QuantLinear.from_codes(codes, scales, bits=4, group_size=32)
    expected = PackedWeight.from_codes(codes, scales.half(), bits=4, group_size=32)
    assert torch.equal(layer.dequantize(), reference.dequantize(expected))


def test_dtype_casts_leave_the_format_alone():
    layer = random_layer(4, symmetric=False, bias=True)
    before = layer.dequantize()
    layer.to(torch.bfloat16)
    layer.half()
    assert {t.dtype for t in layer.state_dict().values()} == {torch.int32, torch.float16, torch.float32}
    assert torch.equal(layer.dequantize(), before)


def test_constructor_rejects_bad_formats():
    with pytest.raises(ValueError, match="bits=7"):
        QuantLinear(64, 8, bits=7)
    with pytest.raises(ValueError, match="group_size"):
        QuantLinear(64, 8, bits=4, group_size=0)


def test_fp8_layer_round_trips_and_follows_the_reference(tmp_path):
    values = (torch.randn(6, 40) * 8).to(torch.float8_e4m3fn)
    weight = Fp8Weight(values, (torch.rand(6) + 0.5).half())
    bias = torch.randn(6)
    layer = Fp8Linear.from_weight(weight, bias)
    layer.half()
    save_file(layer.state_dict(), tmp_path / "fp8.safetensors")
    fresh = Fp8Linear(40, 6, bias=True)
    fresh.load_state_dict(load_file(tmp_path / "fp8.safetensors"))
    assert fresh.weight.dtype == torch.float8_e4m3fn
    x = torch.randn(3, 40)
    assert torch.equal(fresh(x), reference.matmul(x, weight, bias))
    assert torch.equal(fresh.dequantize(), reference.dequantize(weight))

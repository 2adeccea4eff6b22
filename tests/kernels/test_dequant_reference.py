"""The reference: dequantisation follows the storage convention element by element."""

import pytest
import torch

from bitalloc.kernels import reference
from bitalloc.kernels.packing import PLANES
from bitalloc.kernels.weights import Fp8Weight, PackedWeight


def dequantize_by_hand(codes, scales, offsets, bits, group_size):
    rows = []
    for n, row in enumerate(codes.tolist()):
        out = []
        for k, q in enumerate(row):
            s = float(scales[n, k // group_size])
            m = -(1 << (bits - 1)) * s if offsets is None else float(offsets[n, k // group_size])
            out.append(q * s + m)
        rows.append(out)
    return torch.tensor(rows, dtype=torch.float32)


@pytest.mark.parametrize("bits", sorted(PLANES))
@pytest.mark.parametrize("group_size", [4, 7, 13])
@pytest.mark.parametrize("symmetric", [True, False])
def test_dequantize_follows_the_convention(bits, group_size, symmetric):
    gen = torch.Generator().manual_seed(bits * 100 + group_size)
    n, k = 3, 13
    groups = -(-k // group_size)
    codes = torch.randint(0, 1 << bits, (n, k), generator=gen)
    codes[0, 0], codes[0, 1] = 0, (1 << bits) - 1
    scales = torch.rand(n, groups, generator=gen).half()
    offsets = None if symmetric else torch.randn(n, groups, generator=gen).half()
    weight = PackedWeight.from_codes(codes, scales, offsets, bits=bits, group_size=group_size)
    expected = dequantize_by_hand(codes, scales, offsets, bits, group_size)
    assert torch.equal(reference.dequantize(weight), expected)


def test_symmetric_zero_point_dequantises_to_zero():
    codes = torch.full((2, 8), 8)
    weight = PackedWeight.from_codes(codes, torch.rand(2, 1) + 0.1, bits=4)
    assert weight.zero_point == 8
    assert torch.equal(reference.dequantize(weight), torch.zeros(2, 8))


def test_per_channel_is_one_group_of_k():
    weight = PackedWeight.from_codes(torch.randint(0, 4, (2, 10)), torch.rand(2, 1), bits=2)
    assert (weight.group_size, weight.num_groups) == (10, 1)


def test_fp8_dequantises_with_a_scale_per_row():
    values = torch.tensor([[1.0, -2.0, 0.5], [448.0, 0.0, -0.125]]).to(torch.float8_e4m3fn)
    scales = torch.tensor([2.0, 0.5]).half()
    expected = torch.tensor([[2.0, -4.0, 1.0], [224.0, 0.0, -0.0625]])
    assert torch.equal(reference.dequantize(Fp8Weight(values, scales)), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_matmul_adds_bias_and_keeps_the_dtype(dtype):
    weight = PackedWeight.from_codes(torch.randint(0, 16, (5, 9)), torch.rand(5, 3), bits=4, group_size=4)
    x = torch.randn(2, 4, 9).to(dtype)
    bias = torch.randn(5)
    y = reference.matmul(x, weight, bias)
    expected = x.float() @ reference.dequantize(weight).T + bias
    assert y.dtype == dtype and y.shape == (2, 4, 5)
    assert torch.equal(y, expected.to(dtype))


def test_matmul_rejects_the_wrong_width():
    weight = PackedWeight.from_codes(torch.zeros(5, 9, dtype=torch.int64), torch.rand(5, 1), bits=4)
    with pytest.raises(ValueError, match="in_features=9"):
        reference.matmul(torch.randn(2, 8), weight)


def test_packed_weight_names_the_bad_field():
    weight = PackedWeight.from_codes(torch.zeros(4, 64, dtype=torch.int64), torch.rand(4, 2), bits=3, group_size=32)
    with pytest.raises(ValueError, match="scales: expected float16"):
        PackedWeight(weight.planes, weight.scales.float(), None, 3, 32, 64)
    with pytest.raises(ValueError, match=r"planes\[1\]"):
        PackedWeight((weight.planes[0], weight.planes[0]), weight.scales, None, 3, 32, 64)
    with pytest.raises(ValueError, match="offsets: expected float16 \\(4, 2\\)"):
        PackedWeight(weight.planes, weight.scales, weight.scales[:, :1], 3, 32, 64)
    with pytest.raises(ValueError, match="values: expected"):
        Fp8Weight(torch.zeros(2, 2), torch.ones(2).half())

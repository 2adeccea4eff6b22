"""The decode GEMV against the reference (interpreter on CPU, compiled on a GPU)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitalloc.kernels import reference
from bitalloc.kernels.gemv import _CONFIGS, GEMV_MAX_BATCH, _fits_registers, gemv
from bitalloc.kernels.packing import PLANES
from bitalloc.kernels.weights import Fp8Weight

BITS = sorted(PLANES)
GROUPS = [32, 64, 128, None]
# K = 200 is neither a multiple of the tile (64 under the interpreter) nor of any group: the last group is partial.
N, K = 24, 200


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_every_width_and_group(bits, group_size, symmetric, make_weight, device, close):
    weight = make_weight(N, K, bits, group_size, symmetric, seed=bits)
    x = torch.randn(3, K, device=device)
    close(gemv(x, weight), reference.matmul(x, weight), rel=1e-5)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("codes", ["min", "max", "extremes"])
def test_smallest_and_largest_codes(bits, codes, make_weight, device, close):
    weight = make_weight(N, K, bits, 32, symmetric=False, codes=codes)
    x = torch.randn(1, K, device=device)
    close(gemv(x, weight), reference.matmul(x, weight), rel=1e-5)


@pytest.mark.parametrize("batch", range(1, GEMV_MAX_BATCH + 1))
def test_every_batch_size(batch, make_weight, device, close):
    weight = make_weight(N, K, 3, 64, symmetric=False)
    x = torch.randn(batch, K, device=device)
    close(gemv(x, weight), reference.matmul(x, weight), rel=1e-5)


@pytest.mark.parametrize("split_k", [1, 2, 3, 5, 8])
def test_split_k_sums_every_column_once(split_k, make_weight, device, close):
    # 300 columns are 5 tiles of 64: 8 splits leave three programs without work.
    weight = make_weight(N, 300, 5, 32)
    x = torch.randn(2, 300, device=device)
    bias = torch.randn(N, device=device)
    close(gemv(x, weight, bias, split_k=split_k), reference.matmul(x, weight, bias), rel=1e-5)


@pytest.mark.parametrize("dtype, rel", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("split_k", [1, 2])
def test_half_precision_activations_and_bias(dtype, rel, split_k, make_weight, device, close):
    weight = make_weight(N, K, 4, 128, symmetric=False)
    x = torch.randn(4, K, device=device).to(dtype)
    bias = torch.randn(N, device=device).half()
    close(gemv(x, weight, bias, split_k=split_k), reference.matmul(x, weight, bias), rel=rel)


def test_fp8_weight(device, close):
    values = (torch.randn(N, K) * 4).to(torch.float8_e4m3fn)
    weight = Fp8Weight(values.to(device), (torch.rand(N) / 4).half().to(device))
    x = torch.randn(5, K, device=device)
    close(gemv(x, weight, split_k=2), reference.matmul(x, weight), rel=1e-5)


@settings(max_examples=12, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    group_size=st.sampled_from([32, 64, 128, None]),
    symmetric=st.booleans(),
    n=st.integers(1, 40),
    k=st.integers(1, 300),
    batch=st.integers(1, GEMV_MAX_BATCH),
    split_k=st.integers(1, 4),
)
def test_random_shapes(bits, group_size, symmetric, n, k, batch, split_k, make_weight, device, close):
    weight = make_weight(n, k, bits, group_size, symmetric)
    x = torch.randn(batch, k, device=device)
    close(gemv(x, weight, split_k=split_k), reference.matmul(x, weight), rel=1e-5)


def test_rejects_more_rows_than_a_gemv_takes(make_weight, device):
    weight = make_weight(N, K, 4, 32)
    with pytest.raises(ValueError, match=f"1 to {GEMV_MAX_BATCH} rows"):
        gemv(torch.randn(GEMV_MAX_BATCH + 1, K, device=device), weight)


def test_rejects_group_sizes_the_kernels_cannot_tile(make_weight, device):
    weight = make_weight(N, K, 4, 48)
    with pytest.raises(ValueError, match="group_size=48"):
        gemv(torch.randn(1, K, device=device), weight)


def test_rejects_the_wrong_activation_width(make_weight, device):
    with pytest.raises(ValueError, match=rf"x: expected \[M, {K}\]"):
        gemv(torch.randn(1, K + 1, device=device), make_weight(N, K, 4, 32))


def test_tiles_shrink_as_the_batch_grows():
    one = _fits_registers(_CONFIGS, {}, BLOCK_M=1, FP8=False)
    eight = _fits_registers(_CONFIGS, {}, BLOCK_M=8, FP8=False)
    fp8 = _fits_registers(_CONFIGS, {}, BLOCK_M=8, FP8=True)
    assert one == _CONFIGS
    assert 0 < len(eight) < len(one)
    assert all(8 * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"] <= 128 * 32 * c.num_warps for c in eight)
    assert len(fp8) == 1  # nothing fits the fp8 budget at batch 8: the smallest tile is kept

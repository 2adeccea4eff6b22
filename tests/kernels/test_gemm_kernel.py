"""The prefill GEMM against the reference (interpreter on CPU, compiled on a GPU)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bitalloc.kernels import reference
from bitalloc.kernels.configs import INTERPRET
from bitalloc.kernels.gemm import gemm
from bitalloc.kernels.packing import PLANES
from bitalloc.kernels.weights import Fp8Weight

BITS = sorted(PLANES)
GROUPS = [32, 64, 128, None]
# 19 rows and 40 outputs leave partial tiles in M and N; K = 200 leaves a partial tile and a partial group.
M, N, K = 19, 40, 200


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("group_size", GROUPS)
@pytest.mark.parametrize("symmetric", [True, False])
def test_every_width_and_group(bits, group_size, symmetric, make_weight, device, close):
    weight = make_weight(N, K, bits, group_size, symmetric, seed=bits)
    x = torch.randn(M, K, device=device)
    close(gemm(x, weight), reference.matmul(x, weight), rel=1e-5)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("codes", ["min", "max", "extremes"])
def test_smallest_and_largest_codes(bits, codes, make_weight, device, close):
    weight = make_weight(N, K, bits, 64, symmetric=False, codes=codes)
    x = torch.randn(M, K, device=device)
    close(gemm(x, weight), reference.matmul(x, weight), rel=1e-5)


@pytest.mark.parametrize("batch", [1, 9, 33, 47])
def test_odd_batch_sizes_with_bias(batch, make_weight, device, close):
    # 72 outputs are three column blocks, so the grouped program order has a partial group.
    weight = make_weight(72, K, 3, 32, symmetric=False)
    x = torch.randn(batch, K, device=device)
    bias = torch.randn(72, device=device)
    close(gemm(x, weight, bias), reference.matmul(x, weight, bias), rel=1e-5)


@pytest.mark.parametrize(
    "dtype, rel",
    [
        (torch.float16, 3e-3),
        pytest.param(
            torch.bfloat16, 2e-2,
            marks=pytest.mark.skipif(INTERPRET, reason="the Triton interpreter's tl.dot multiplies bf16 bit patterns"),
        ),
    ],
)
def test_half_precision_activations(dtype, rel, make_weight, device, close):
    weight = make_weight(N, K, 4, 128, symmetric=False)
    x = torch.randn(M, K, device=device).to(dtype)
    close(gemm(x, weight), reference.matmul(x, weight), rel=rel)


def test_fp8_weight(device, close):
    values = (torch.randn(N, K) * 4).to(torch.float8_e4m3fn)
    weight = Fp8Weight(values.to(device), (torch.rand(N) / 4).half().to(device))
    x = torch.randn(M, K, device=device)
    close(gemm(x, weight), reference.matmul(x, weight), rel=1e-5)


def test_no_rows_gives_an_empty_result(make_weight, device):
    assert gemm(torch.randn(0, K, device=device), make_weight(N, K, 4, 32)).shape == (0, N)


@settings(max_examples=10, deadline=None)
@given(
    bits=st.sampled_from(BITS),
    group_size=st.sampled_from([32, 64, 128, None]),
    symmetric=st.booleans(),
    m=st.integers(1, 40),
    n=st.integers(1, 70),
    k=st.integers(1, 260),
)
def test_random_shapes(bits, group_size, symmetric, m, n, k, make_weight, device, close):
    weight = make_weight(n, k, bits, group_size, symmetric)
    x = torch.randn(m, k, device=device)
    close(gemm(x, weight), reference.matmul(x, weight), rel=1e-5)

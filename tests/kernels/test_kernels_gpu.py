"""The compiled kernels on a real GPU: every autotune candidate, and the checks of the other files at real shapes."""

import pytest
import torch

import bitalloc.kernels.gemm as gemm_module
import bitalloc.kernels.gemv as gemv_module
from bitalloc.kernels import reference
from bitalloc.kernels.configs import INTERPRET
from bitalloc.kernels.dispatch import quant_matmul
from bitalloc.kernels.gemv import choose_split_k
from bitalloc.kernels.packing import PLANES
from bitalloc.kernels.quant_linear import Fp8Linear, QuantLinear
from bitalloc.kernels.weights import Fp8Weight

pytestmark = pytest.mark.skipif(
    INTERPRET or not torch.cuda.is_available(), reason="needs a CUDA device and compiled (not interpreted) kernels"
)
needs_fp8 = pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
    reason="fp8 conversions need compute capability 8.9+",
)

FORMATS = [(3, 32, False), (4, 128, True), (8, None, True)]


@pytest.fixture
def only_config(monkeypatch):
    def select(kernel, config):
        monkeypatch.setattr(kernel, "configs", [config])

    return select


@pytest.mark.parametrize("config", gemv_module._CONFIGS, ids=str)
@pytest.mark.parametrize("bits, group_size, symmetric", FORMATS)
def test_every_gemv_candidate(config, bits, group_size, symmetric, only_config, make_weight, close):
    only_config(gemv_module._gemv_kernel, config)
    weight = make_weight(1024, 4096, bits, group_size, symmetric)
    x = torch.randn(3, 4096, device="cuda")
    bias = torch.randn(1024, device="cuda")
    expected = reference.matmul(x, weight, bias)
    for split_k in (1, 4):
        close(gemv_module.gemv(x, weight, bias, split_k=split_k), expected, rel=1e-5)


@pytest.mark.parametrize("config", gemm_module._CONFIGS, ids=str)
@pytest.mark.parametrize("bits, group_size, symmetric", FORMATS)
def test_every_gemm_candidate(config, bits, group_size, symmetric, only_config, make_weight, close):
    only_config(gemm_module._gemm_kernel, config)
    weight = make_weight(1000, 4096, bits, group_size, symmetric)
    x = torch.randn(77, 4096, device="cuda").half()
    bias = torch.randn(1000, device="cuda")
    close(gemm_module.gemm(x, weight, bias), reference.matmul(x, weight, bias), rel=3e-3)


@pytest.mark.parametrize("bits", sorted(PLANES))
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
@pytest.mark.parametrize("symmetric, batch", [(True, 1), (False, 4), (True, 16), (False, 64)])
def test_real_shape(bits, group_size, symmetric, batch, make_weight, close):
    weight = make_weight(4096, 4096, bits, group_size, symmetric, codes="random")
    x = torch.randn(batch, 4096, device="cuda").half()
    close(quant_matmul(x, weight), reference.matmul(x, weight), rel=3e-3)


@pytest.mark.parametrize("codes", ["min", "max", "extremes"])
@pytest.mark.parametrize("batch", [1, 64])
def test_real_shape_extreme_codes(codes, batch, make_weight, close):
    weight = make_weight(4096, 4096, 8, 128, symmetric=False, codes=codes)
    x = torch.randn(batch, 4096, device="cuda").half()
    close(quant_matmul(x, weight), reference.matmul(x, weight), rel=3e-3)


def test_tall_k_is_split(make_weight, close):
    weight = make_weight(4096, 14336, 4, 128)
    assert choose_split_k(4096, 14336, torch.device("cuda")) > 1
    x = torch.randn(1, 14336, device="cuda").half()
    close(quant_matmul(x, weight), reference.matmul(x, weight), rel=3e-3)


@pytest.mark.parametrize("batch", [2, 33])
def test_bfloat16_activations(batch, make_weight, close):
    weight = make_weight(2048, 4096, 5, 64, symmetric=False)
    x = torch.randn(batch, 4096, device="cuda").bfloat16()
    close(quant_matmul(x, weight), reference.matmul(x, weight), rel=2e-2)


@needs_fp8
@pytest.mark.parametrize("batch", [1, 5, 48])
def test_fp8(batch, close):
    values = (torch.randn(2048, 4096, device="cuda") * 8).to(torch.float8_e4m3fn)
    layer = Fp8Linear.from_weight(Fp8Weight(values, (torch.rand(2048, device="cuda") / 8).half()))
    x = torch.randn(batch, 4096, device="cuda").half()
    close(layer(x), reference.matmul(x, layer.fp8_weight()), rel=3e-3)


@pytest.mark.parametrize("batch", [1, 40])
def test_quant_linear_runs_the_kernels(batch, make_weight, close, monkeypatch):
    weight = make_weight(2048, 4096, 3, 128, symmetric=False)
    layer = QuantLinear.from_weight(weight, torch.randn(2048, device="cuda"))
    monkeypatch.setattr(reference, "matmul", None)  # forward must not fall back to the reference
    x = torch.randn(2, batch, 4096, device="cuda").half()
    y = layer(x)
    monkeypatch.undo()
    close(y, reference.matmul(x, weight, layer.bias), rel=3e-3)

"""quant_matmul: decode batches take the GEMV, larger ones the GEMM, any leading shape."""

import pytest
import torch

import bitalloc.kernels.dispatch as dispatch
from bitalloc.kernels import reference
from bitalloc.kernels.gemv import GEMV_MAX_BATCH


@pytest.mark.parametrize(
    "shape, path",
    [((1, 64), "gemv"), ((2, 2, 64), "gemv"), ((GEMV_MAX_BATCH, 64), "gemv"),
     ((GEMV_MAX_BATCH + 1, 64), "gemm"), ((3, 5, 64), "gemm")],
)
def test_batch_size_picks_the_kernel(shape, path, make_weight, device, close, monkeypatch):
    used = []
    for name in ("gemv", "gemm"):
        kernel = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, _k=kernel, _n=name, **kw: used.append(_n) or _k(*a, **kw))
    weight = make_weight(20, 64, 4, 32)
    x = torch.randn(*shape, device=device)
    y = dispatch.quant_matmul(x, weight)
    assert used == [path]
    assert y.shape == (*shape[:-1], 20)
    close(y, reference.matmul(x, weight), rel=1e-5)


def test_rejects_the_wrong_width(make_weight, device):
    with pytest.raises(ValueError, match="in_features=64"):
        dispatch.quant_matmul(torch.randn(2, 63, device=device), make_weight(20, 64, 4, 32))

"""One entry point for a quantized linear layer: the GEMV for decode, the GEMM for prefill."""

from __future__ import annotations

import torch

from bitalloc.kernels.gemm import gemm
from bitalloc.kernels.gemv import GEMV_MAX_BATCH, gemv
from bitalloc.kernels.weights import Fp8Weight, PackedWeight


def quant_matmul(x: torch.Tensor, weight: PackedWeight | Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W^T + bias`` for x [..., K] on the Triton kernels; y [..., N] has x's dtype.

    Up to ``GEMV_MAX_BATCH`` rows the layer is bound by reading the weight and the
    GEMV streams it; past that the weight is reused enough for the GEMM's tensor cores.
    """
    if x.dim() == 0 or x.shape[-1] != weight.in_features:
        raise ValueError(f"x: last dimension must be in_features={weight.in_features}, got shape {tuple(x.shape)}")
    rows = x.reshape(-1, weight.in_features)
    if 1 <= rows.shape[0] <= GEMV_MAX_BATCH:
        y = gemv(rows, weight, bias)
    else:
        y = gemm(rows, weight, bias)
    return y.reshape(*x.shape[:-1], weight.out_features)

"""Pure PyTorch reference for every kernel: the definition the kernels are tested against.

It runs anywhere (CPU included) and favours clarity over speed: dequantise the
whole weight to fp32, then one fp32 matmul.
"""

from __future__ import annotations

import torch

from bitalloc.kernels.packing import unpack
from bitalloc.kernels.weights import Fp8Weight, PackedWeight


def dequantize(weight: PackedWeight | Fp8Weight) -> torch.Tensor:
    """The fp32 weight [N, K] a quantized weight stands for."""
    if isinstance(weight, Fp8Weight):
        return weight.values.float() * weight.scales.float()[:, None]
    k = weight.in_features
    codes = unpack(weight.planes, k, weight.bits).float()
    scales = weight.scales.float().repeat_interleave(weight.group_size, dim=1)[:, :k]
    if weight.offsets is None:
        offsets = -weight.zero_point * scales
    else:
        offsets = weight.offsets.float().repeat_interleave(weight.group_size, dim=1)[:, :k]
    # A code (<= 8 bits) times an fp16 scale (11-bit significand) is exact in fp32,
    # so this multiply-then-add rounds once, like the fused multiply-add in the kernels.
    return torch.addcmul(offsets, codes, scales)


def matmul(x: torch.Tensor, weight: PackedWeight | Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W^T + bias`` for x [..., K], computed in fp32 and returned in x's dtype."""
    if x.shape[-1] != weight.in_features:
        raise ValueError(f"x: last dimension must be in_features={weight.in_features}, got shape {tuple(x.shape)}")
    y = x.float() @ dequantize(weight).to(x.device).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)

"""What the GEMV and GEMM kernels share: unpacking words, per-group parameters, and how a weight maps to arguments.

A tile is ``BLOCK_N`` rows by ``BLOCK_K`` columns starting at column ``k0``
(a multiple of ``BLOCK_K``). It holds either part of one group
(``BLOCK_K <= GROUP``) or ``BLOCK_K // GROUP`` whole groups, so the kernels view
it as T groups of ``GS = min(BLOCK_K, GROUP)`` columns, each with one scale per
row. Every plane is read as whole int32 words.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitalloc.kernels.configs import INTERPRET
from bitalloc.kernels.packing import plane_widths
from bitalloc.kernels.weights import Fp8Weight, PackedWeight

PER_CHANNEL_GROUP = 1 << 30
"""The group the kernels use for a per-channel weight: a power of two above any K, so ``k // GROUP == 0``."""

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

FLOAT_TWO_POW_23 = tl.constexpr(0x4B000000)
"""The bits of the float 2**23."""


@triton.jit
def unpack_fields(words, WIDTH: tl.constexpr):
    """The WIDTH-bit fields of int32 words (uint32), on log2(32 / WIDTH) new minor axes of size 2.

    Each step joins a value with itself shifted right by half its span, until
    the spans are WIDTH bits, so reshaping the new axes into one gives the
    fields in code order; one mask per field drops the higher bits.
    ``tl.join`` keeps both halves in the thread that loaded the word, so
    unpacking moves no data between lanes and has no branches.
    """
    v = words.to(tl.uint32, bitcast=True)
    v = tl.join(v, v >> 16)
    if WIDTH <= 8:
        v = tl.join(v, v >> 8)
    if WIDTH <= 4:
        v = tl.join(v, v >> 4)
    if WIDTH <= 2:
        v = tl.join(v, v >> 2)
    if WIDTH == 1:
        v = tl.join(v, v >> 1)
    return v & ((1 << WIDTH) - 1)


@triton.jit
def codes_to_float(fields, ZERO: tl.constexpr):
    """Exact ``float(field - ZERO)`` for fields below 2**23.

    OR-ing the field into the mantissa of 2**23 is a bit pattern (the OR folds
    into the mask that extracted the field), so the conversion costs one
    subtraction instead of an int-to-float instruction, which runs at a
    quarter of the FP32 rate.
    """
    return (fields | FLOAT_TWO_POW_23).to(tl.float32, bitcast=True) - (8388608.0 + ZERO)


@triton.jit
def load_group_params(ptr, stride, rows, row_mask, k0, G, GROUP: tl.constexpr, GS: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 [BLOCK_N, T]: the scales (or offsets) of the T = BLOCK_K // GS groups of a tile starting at k0."""
    groups = (k0 + tl.arange(0, BLOCK_K // GS) * GS) // GROUP
    mask = row_mask[:, None] & (groups < G)[None, :]
    return tl.load(ptr + rows[:, None] * stride + groups[None, :], mask=mask, other=0.0).to(tl.float32)


def weight_kwargs(weight: PackedWeight | Fp8Weight) -> dict[str, object]:
    """The kernel arguments that describe a weight (pointers, strides and format constants)."""
    if isinstance(weight, Fp8Weight):
        values = weight.values.contiguous()
        return dict(
            lo_ptr=values, hi_ptr=None, scale_ptr=weight.scales.contiguous(), offset_ptr=None,
            stride_lo=values.stride(0), stride_hi=0, stride_scale=1, G=1,
            FP8=True, LO_BITS=8, HI_BITS=0, ZERO=0, GROUP=PER_CHANNEL_GROUP, HAS_OFFSET=False,
        )
    two_planes = len(weight.planes) == 2
    lo = weight.planes[0].contiguous()
    hi = weight.planes[1].contiguous() if two_planes else None
    lo_bits, hi_bits = plane_widths(weight.bits)[0], plane_widths(weight.bits)[-1] if two_planes else 0
    scales = weight.scales.contiguous()
    return dict(
        lo_ptr=lo, hi_ptr=hi, scale_ptr=scales,
        offset_ptr=None if weight.offsets is None else weight.offsets.contiguous(),
        stride_lo=lo.stride(0), stride_hi=0 if hi is None else hi.stride(0), stride_scale=scales.stride(0),
        G=weight.num_groups, FP8=False, LO_BITS=lo_bits, HI_BITS=hi_bits, ZERO=weight.zero_point,
        GROUP=kernel_group(weight), HAS_OFFSET=weight.offsets is not None,
    )


def kernel_group(weight: PackedWeight) -> int:
    """The group size as the kernels see it; per-channel maps to ``PER_CHANNEL_GROUP``.

    A group must be a power of two of at least 32 codes, so that every packed
    word (up to 32 codes for a 1-bit plane) lies inside one group.
    """
    g = weight.group_size
    if g >= weight.in_features:
        return PER_CHANNEL_GROUP
    if g < 32 or g & (g - 1):
        raise ValueError(
            f"group_size={g}: the Triton kernels need a power of two >= 32, or per-channel (>= in_features); "
            "use bitalloc.kernels.reference for other group sizes"
        )
    return g


def check_launch(
    x: torch.Tensor, weight: PackedWeight | Fp8Weight, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate a kernel call; return x with unit stride along K and a contiguous bias."""
    if x.dim() != 2 or x.shape[1] != weight.in_features:
        raise ValueError(f"x: expected [M, {weight.in_features}], got shape {tuple(x.shape)}")
    if x.dtype not in ACTIVATION_DTYPES:
        raise TypeError(f"x: expected one of {ACTIVATION_DTYPES}, got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but the weight is on {weight.device}")
    if x.device.type != "cuda" and not INTERPRET:
        raise RuntimeError(
            f"the Triton kernels need a CUDA device (x is on {x.device}); "
            "use bitalloc.kernels.reference on CPU, or set TRITON_INTERPRET=1 before importing bitalloc.kernels"
        )
    if bias is not None and (bias.shape != (weight.out_features,) or bias.device != x.device):
        raise ValueError(
            f"bias: expected [{weight.out_features}] on {x.device}, got {tuple(bias.shape)} on {bias.device}"
        )
    if isinstance(weight, PackedWeight):
        kernel_group(weight)
    return (x if x.stride(1) == 1 else x.contiguous()), (None if bias is None else bias.contiguous())

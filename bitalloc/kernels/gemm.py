"""Fused dequantise + GEMM for prefill (batch above ``GEMV_MAX_BATCH``).

With many rows of x each weight is reused enough for the tensor cores to be
the limit, so each program reads a [BLOCK_N, BLOCK_K] tile as whole packed
words, unpacks it in registers (``tiles.unpack_fields``), dequantises it in
fp32 (``q * s + m``, one FMA), rounds it to x's dtype and feeds ``tl.dot``
with fp32 accumulation. The weight never exists in 16 bits outside registers
and shared memory. Programs are ordered in groups of ``GROUP_M`` row blocks so
that neighbours reuse the same weight tiles from L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitalloc.kernels.configs import candidates, quick_bench
from bitalloc.kernels.tiles import check_launch, codes_to_float, load_group_params, unpack_fields, weight_kwargs
from bitalloc.kernels.weights import Fp8Weight, PackedWeight

_CONFIGS = [
    triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8},
                  num_warps=warps, num_stages=stages)
    for block_m, block_n, block_k, warps, stages in [
        (16, 32, 128, 4, 4), (16, 64, 128, 4, 4), (32, 64, 128, 4, 4),
        (64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3),
    ]
]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 2})


@triton.jit
def _plane_tile(ptr, stride, rows, row_mask, k0, K, WIDTH: tl.constexpr, EVEN_K: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """uint32 [BLOCK_N, BLOCK_K]: one plane's fields for columns k0 .. k0 + BLOCK_K, read as whole words."""
    C: tl.constexpr = 32 // WIDTH
    words = k0 // C + tl.arange(0, BLOCK_K // C)
    mask = row_mask[:, None]
    if not EVEN_K:
        mask &= (words < tl.cdiv(K, C))[None, :]
    packed = tl.load(ptr + rows[:, None] * stride + words[None, :], mask=mask, other=0)
    return tl.reshape(unpack_fields(packed, WIDTH), (BLOCK_N, BLOCK_K))


@triton.autotune(
    configs=candidates(_CONFIGS, _INTERPRETER_CONFIG),
    key=["N", "K", "M_BUCKET", "FP8", "LO_BITS", "HI_BITS", "GROUP", "HAS_OFFSET"],
    do_bench=quick_bench,
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _gemm_kernel(
    x_ptr, lo_ptr, hi_ptr, scale_ptr, offset_ptr, bias_ptr, out_ptr,
    M, N, K, G, stride_x, stride_lo, stride_hi, stride_scale, M_BUCKET,
    FP8: tl.constexpr, LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, ZERO: tl.constexpr,
    GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
):
    GS: tl.constexpr = min(BLOCK_K, GROUP)
    T: tl.constexpr = BLOCK_K // GS
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * blocks_n)) * GROUP_M
    group_rows = tl.minimum(blocks_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * blocks_n)) % group_rows
    pid_n = (pid % (GROUP_M * blocks_n)) // group_rows

    rows_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rows_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = rows_m < M
    mask_n = rows_n < N
    x_rows = x_ptr + rows_m.to(tl.int64)[:, None] * stride_x
    w_rows = rows_n.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x_mask = mask_m[:, None]
        if not EVEN_K:
            x_mask &= (cols < K)[None, :]
        x = tl.load(x_rows + cols[None, :], mask=x_mask, other=0.0)
        if FP8:
            w_mask = mask_n[:, None]
            if not EVEN_K:
                w_mask &= (cols < K)[None, :]
            q = tl.load(lo_ptr + w_rows[:, None] * stride_lo + cols[None, :], mask=w_mask, other=0.0).to(tl.float32)
        else:
            fields = _plane_tile(lo_ptr, stride_lo, w_rows, mask_n, k0, K, LO_BITS, EVEN_K, BLOCK_N, BLOCK_K)
            if HI_BITS > 0:
                high = _plane_tile(hi_ptr, stride_hi, w_rows, mask_n, k0, K, HI_BITS, EVEN_K, BLOCK_N, BLOCK_K)
                fields |= high << LO_BITS
            q = codes_to_float(fields, ZERO)
        q = tl.reshape(q, (BLOCK_N, T, GS))
        scale = load_group_params(scale_ptr, stride_scale, w_rows, mask_n, k0, G, GROUP, GS, BLOCK_K)
        if HAS_OFFSET:
            offset = load_group_params(offset_ptr, stride_scale, w_rows, mask_n, k0, G, GROUP, GS, BLOCK_K)
            w = q * scale[:, :, None] + offset[:, :, None]
        else:
            w = q * scale[:, :, None]
        w = tl.reshape(w, (BLOCK_N, BLOCK_K)).to(x_ptr.dtype.element_ty)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rows_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rows_m.to(tl.int64)[:, None] * N + rows_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def gemm(x: torch.Tensor, weight: PackedWeight | Fp8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x @ W^T + bias`` for x [M, K], any M >= 1; y has x's dtype."""
    x, bias = check_launch(x, weight, bias)
    m, n, k = x.shape[0], weight.out_features, weight.in_features
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    _gemm_kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)](
        x, bias_ptr=bias, out_ptr=out, M=m, N=n, K=k, stride_x=x.stride(0),
        # Prefill lengths vary per request: tune once per power of two, not once per length.
        M_BUCKET=triton.next_power_of_2(m), HAS_BIAS=bias is not None,
        # fp32 activations keep fp32 accuracy on the tensor cores (three tf32 products); an
        # exact fp32 dot falls back to scalar FMAs and spills. fp16/bf16 ignore the setting.
        DOT_PRECISION="tf32x3" if x.dtype == torch.float32 else "ieee",
        **weight_kwargs(weight),
    )
    return out

"""Fused dequantise + GEMV for decode (batch 1 to ``GEMV_MAX_BATCH``).

At small batch each weight is read once and used a few times, so the kernel
must stream the packed words at memory speed with as few instructions per code
as possible. Each program takes ``BLOCK_N`` rows and walks K in tiles:

* a tile is read as whole int32 words, vectorised along K, and unpacked with
  shifts and masks (``tiles.unpack_fields``) in the registers of the thread
  that loaded them; codes become floats through the mantissa of 2**23;
* scale and offset are factored out of each group's dot product,
  ``sum_k (q s + m) x = s * sum_k q x + m * sum_k x``, so a code costs one
  multiply-add per batch row and a group one more;
* partial sums stay per word, in the layout of the codes, until after the K
  loop: nothing crosses lanes inside it (x, loaded at a lower rank than the
  codes, is what gets moved into that layout).

A plane of a 3, 5 or 6-bit code is dotted on its own and the high plane's sum
weighted by ``2**LO_BITS``, which is exact by linearity. When the rows give
too few programs to keep every SM streaming (short N, tall K), K is split
across programs that write fp32 partial sums, and a second small kernel adds
them, deterministically unlike atomics, with the bias.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from bitalloc.kernels.configs import INTERPRET, candidates, quick_bench
from bitalloc.kernels.tiles import check_launch, codes_to_float, load_group_params, unpack_fields, weight_kwargs
from bitalloc.kernels.weights import Fp8Weight, PackedWeight

GEMV_MAX_BATCH = 8
"""Every thread holds the x values of its columns for each batch row, so tiles shrink as the batch grows;
past this the GEMM's tensor cores are faster."""

_CONFIGS = [
    triton.Config({"BLOCK_N": block_n, "BLOCK_K": block_k}, num_warps=warps, num_stages=stages)
    for block_n, block_k, warps, stages in [
        (16, 256, 4, 3), (32, 256, 4, 3), (8, 512, 4, 4), (16, 512, 4, 3), (64, 128, 4, 4), (16, 128, 4, 4),
        (8, 256, 4, 4),
    ]
]
_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_K": 64})


@triton.jit
def _plane_dots(x_ptr, stride_x, batch, batch_mask, ptr, stride, rows, row_mask, k0, K,
                FP8: tl.constexpr, WIDTH: tl.constexpr, ZERO: tl.constexpr, EVEN_K: tl.constexpr,
                GS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One plane of a tile against x: per-word dot products [BLOCK_M, BLOCK_N, T, WPG] and per-word sums of x.

    The tile is viewed as T groups of WPG words of C codes. The codes of a word
    stay in one thread's registers, so the sums over C never cross lanes; the
    words are only summed after the K loop. An fp8 weight is a plane of one
    value per "word".
    """
    C: tl.constexpr = 1 if FP8 else 32 // WIDTH
    T: tl.constexpr = BLOCK_K // GS
    WPG: tl.constexpr = GS // C
    words = k0 // C + tl.arange(0, T)[:, None] * WPG + tl.arange(0, WPG)[None, :]
    mask = row_mask[None, :, None, None]
    if not EVEN_K:
        mask &= (words < tl.cdiv(K, C))[None, None, :, :]
    packed = tl.load(ptr + rows[None, :, None, None] * stride + words[None, None, :, :], mask=mask,
                     other=0.0 if FP8 else 0)
    if FP8:
        codes = packed.to(tl.float32)[:, :, :, :, None]
    else:
        codes = codes_to_float(tl.reshape(unpack_fields(packed, WIDTH), (1, BLOCK_N, T, WPG, C)), ZERO)
    cols = words[:, :, None] * C + tl.arange(0, C)[None, None, :]
    x_mask = batch_mask[:, None, None, None]
    if not EVEN_K:
        x_mask &= (cols < K)[None, :, :, :]
    # Loaded at a lower rank than the codes, x takes the codes' register layout, not the reverse.
    x = tl.load(x_ptr + batch[:, None, None, None] * stride_x + cols[None, :, :, :], mask=x_mask, other=0.0)
    x = x.to(tl.float32)
    return tl.sum(codes * x[:, None, :, :, :], axis=4), tl.sum(x, axis=3)


def _fits_registers(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """Drop the configs whose tile would spill registers.

    Each thread holds its codes and, for every batch row, the x values of its
    columns, so the tile must shrink as the batch grows. Up to 128 values per
    thread (batch rows x tile / threads) kept sm_90 builds of the integer
    formats near 140 registers without spills; fp8 tiles, one value per
    "word", used far more and get a quarter of that.
    """
    args = {**named_args, **kwargs}
    budget = 32 if args["FP8"] else 128

    def values_per_thread(config: triton.Config) -> float:
        tile = config.kwargs["BLOCK_N"] * config.kwargs["BLOCK_K"]
        return args["BLOCK_M"] * tile / (32 * config.num_warps)

    fitting = [config for config in configs if values_per_thread(config) <= budget]
    return fitting or [min(configs, key=values_per_thread)]


@triton.autotune(
    configs=candidates(_CONFIGS, _INTERPRETER_CONFIG),
    key=["N", "K", "BLOCK_M", "FP8", "LO_BITS", "HI_BITS", "GROUP", "HAS_OFFSET", "SPLIT_K"],
    prune_configs_by={"early_config_prune": _fits_registers},
    do_bench=quick_bench,
)
@triton.heuristics({"EVEN_K": lambda args: args["K"] % args["BLOCK_K"] == 0})
@triton.jit
def _gemv_kernel(
    x_ptr, lo_ptr, hi_ptr, scale_ptr, offset_ptr, bias_ptr, out_ptr,
    M, N, K, G, stride_x, stride_lo, stride_hi, stride_scale,
    BLOCK_M: tl.constexpr,
    FP8: tl.constexpr, LO_BITS: tl.constexpr, HI_BITS: tl.constexpr, ZERO: tl.constexpr,
    GROUP: tl.constexpr, HAS_OFFSET: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    GS: tl.constexpr = min(BLOCK_K, GROUP)
    T: tl.constexpr = BLOCK_K // GS
    C_LO: tl.constexpr = 1 if FP8 else 32 // LO_BITS
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rows64 = rows.to(tl.int64)
    batch = tl.arange(0, BLOCK_M)
    batch_mask = batch < M
    # Splits cover whole tiles, so a tile never straddles two programs.
    k_span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_start = pid_k * k_span
    k_stop = tl.minimum(k_start + k_span, K)
    acc_lo = tl.zeros((BLOCK_M, BLOCK_N, T, GS // C_LO), dtype=tl.float32)
    if HI_BITS > 0:
        acc_hi = tl.zeros((BLOCK_M, BLOCK_N, T, GS * HI_BITS // 32), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        scale = load_group_params(scale_ptr, stride_scale, rows64, row_mask, k0, G, GROUP, GS, BLOCK_K)[None, :, :, None]
        dots, x_words = _plane_dots(x_ptr, stride_x, batch, batch_mask, lo_ptr, stride_lo, rows64, row_mask, k0, K,
                                    FP8, LO_BITS, ZERO, EVEN_K, GS, BLOCK_N, BLOCK_K)
        acc_lo += dots * scale
        if HAS_OFFSET:
            offset = load_group_params(offset_ptr, stride_scale, rows64, row_mask, k0, G, GROUP, GS, BLOCK_K)[None, :, :, None]
            acc_lo += x_words[:, None, :, :] * offset
        if HI_BITS > 0:
            dots, _ = _plane_dots(x_ptr, stride_x, batch, batch_mask, hi_ptr, stride_hi, rows64, row_mask, k0, K,
                                  False, HI_BITS, 0, EVEN_K, GS, BLOCK_N, BLOCK_K)
            acc_hi += dots * scale
    acc = tl.sum(tl.sum(acc_lo, axis=3), axis=2)
    if HI_BITS > 0:
        acc += tl.sum(tl.sum(acc_hi, axis=3), axis=2) * (1 << LO_BITS)
    if HAS_BIAS and SPLIT_K == 1:
        acc += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_k * M * N + batch[:, None] * N + rows[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=batch_mask[:, None] & row_mask[None, :])


@triton.jit
def _sum_splits_kernel(partial_ptr, bias_ptr, out_ptr, MN, N,
                       SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """out = sum over splits of partial[SPLIT_K, M, N] (+ bias), cast to out's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(partial_ptr + split * MN + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def choose_split_k(n: int, k: int, device: torch.device) -> int:
    """Split K until about four programs run per SM, keeping at least 1024 columns per split.

    Rows per program are autotuned; 32 is the nominal block this estimate uses.
    """
    if device.type != "cuda" or INTERPRET:
        return 1
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    split = 1
    while triton.cdiv(n, 32) * split < programs and k // (2 * split) >= 1024:
        split *= 2
    return split


def gemv(
    x: torch.Tensor,
    weight: PackedWeight | Fp8Weight,
    bias: torch.Tensor | None = None,
    *,
    split_k: int | None = None,
) -> torch.Tensor:
    """``y = x @ W^T + bias`` for x [M, K] with M <= GEMV_MAX_BATCH; y has x's dtype."""
    x, bias = check_launch(x, weight, bias)
    m, n, k = x.shape[0], weight.out_features, weight.in_features
    if not 1 <= m <= GEMV_MAX_BATCH:
        raise ValueError(f"x: the GEMV takes 1 to {GEMV_MAX_BATCH} rows, got {m}; use gemm or quant_matmul")
    split = choose_split_k(n, k, x.device) if split_k is None else split_k
    if split < 1:
        raise ValueError(f"split_k: must be positive, got {split}")
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    target = out if split == 1 else torch.empty((split, m, n), dtype=torch.float32, device=x.device)
    _gemv_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), split)](
        x, bias_ptr=bias, out_ptr=target, M=m, N=n, K=k, stride_x=x.stride(0),
        BLOCK_M=triton.next_power_of_2(m), HAS_BIAS=bias is not None, SPLIT_K=split,
        **weight_kwargs(weight),
    )
    if split > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](
            target, bias, out, m * n, n, SPLIT_K=split, HAS_BIAS=bias is not None, BLOCK=block
        )
    return out

"""How one unit's weight is stored in the artifact, and what it becomes at load.

The storage follows from the format, so the artifact holds exactly what ``Format.nbytes``
counts (the search's budgets are the bytes on disk):

* ``packed`` (integer formats): ``qweight`` (+ ``qweight_hi`` for 3, 5 and 6 bits) int32 bit
  planes as in ``kernels.packing``, ``scales`` float16 ``[N, G]`` and, when asymmetric,
  ``offsets`` float16 ``[N, G]``. These are ``kernels.QuantLinear``'s buffers.
* ``fp8`` (``fp8_e4m3``, one scale per output channel): ``weight`` float8_e4m3fn ``[N, K]``
  and ``scales`` float16 ``[N]``: ``kernels.Fp8Linear``'s buffers.
* ``codes`` (NF4, FP6, FP4 and grouped FP8, which no kernel runs): the format's codes (codebook
  indices or float bit patterns) packed in the same bit planes (``qweight``/``qweight_hi``),
  and ``scales`` float16 ``[N, G]``. They are dequantized to the model's dtype at load.
* ``keep`` (bf16, fp16): ``weight`` ``[N, K]`` in that dtype.

At load only ``nn.Linear`` units become kernel layers (``QuantLinear``, ``Fp8Linear``); a Conv
unit (or GPT-2's Conv1D) keeps its module with the weight dequantized, as no kernel runs it.
Every dequantization is ``Format.dequantize`` or the kernels' reference of it, the very
arithmetic simulation uses, so the loaded model computes what the evaluation scored.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from bitalloc.kernels.packing import pack, plane_widths, unpack
from bitalloc.kernels.weights import Fp8Weight, PackedWeight
from bitalloc.quant.formats import Format, IntFormat, KeepFormat, QuantizedTensor, get_format
from bitalloc.quant.quantizers import Method, quantize
from bitalloc.quant.units import set_weight_matrix, weight_matrix

Storage = Literal["packed", "fp8", "codes", "keep"]
PLANES = ("qweight", "qweight_hi")
FP8_PER_CHANNEL = get_format("fp8_e4m3")


def storage_of(fmt: Format) -> Storage:
    if isinstance(fmt, KeepFormat):
        return "keep"
    if isinstance(fmt, IntFormat):
        return "packed"
    return "fp8" if fmt == FP8_PER_CHANNEL else "codes"


def runs_as(fmt: Format, module: nn.Module) -> str:
    """What runs the unit once loaded: a kernel layer, or its own module with a dequantized weight."""
    if isinstance(module, nn.Linear):
        kernel_layer = {"packed": "QuantLinear", "fp8": "Fp8Linear"}.get(storage_of(fmt))
        if kernel_layer:
            return kernel_layer
    return f"{type(module).__name__} (dequantized)"


def encode(w: torch.Tensor, fmt: Format, method: Method, hessian: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The tensors that store the ``[N, K]`` matrix ``w`` in ``fmt``, named relative to the unit."""
    if isinstance(fmt, KeepFormat):
        return {"weight": w.to(fmt.dtype)}
    q = quantize(w.float(), fmt, method, hessian)
    if storage_of(fmt) == "fp8":
        return {"weight": q.codes.view(torch.float8_e4m3fn), "scales": q.scales[:, 0]}
    tensors = dict(zip(PLANES, pack(q.codes, fmt.bits)))
    tensors["scales"] = q.scales
    if q.offsets is not None:
        tensors["offsets"] = q.offsets
    return tensors


def dequantize(tensors: dict[str, torch.Tensor], fmt: Format, k: int) -> torch.Tensor:
    """The matrix the stored tensors stand for (float32, or the kept dtype)."""
    storage = storage_of(fmt)
    if storage == "keep":
        return tensors["weight"]
    if storage == "fp8":
        codes, scales = tensors["weight"].view(torch.uint8), tensors["scales"][:, None]
    else:
        codes, scales = unpack(_planes(tensors, fmt), k, fmt.bits), tensors["scales"]
    return QuantizedTensor(fmt, codes, scales, tensors.get("offsets")).dequantize()


def decode(tensors: dict[str, torch.Tensor], fmt: Format, module: nn.Module) -> nn.Module:
    """The module that runs the unit: a kernel layer for a Linear, else ``module`` with its weight set."""
    k = weight_matrix(module).shape[1]
    kind = runs_as(fmt, module)
    if kind in ("QuantLinear", "Fp8Linear"):
        from bitalloc.kernels.quant_linear import Fp8Linear, QuantLinear  # defines Triton kernels: import on use

        bias = None if module.bias is None else module.bias.detach()
        if kind == "Fp8Linear":
            return Fp8Linear.from_weight(Fp8Weight(tensors["weight"], tensors["scales"]), bias)
        group = k if fmt.group_size is None else fmt.group_size
        weight = PackedWeight(_planes(tensors, fmt), tensors["scales"], tensors.get("offsets"), fmt.bits, group, k)
        return QuantLinear.from_weight(weight, bias)
    set_weight_matrix(module, dequantize(tensors, fmt, k))
    return module


def _planes(tensors: dict[str, torch.Tensor], fmt: Format) -> tuple[torch.Tensor, ...]:
    return tuple(tensors[name] for name in PLANES[: len(plane_widths(fmt.bits))])

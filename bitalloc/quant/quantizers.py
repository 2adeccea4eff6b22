"""Quantizers: round-to-nearest for every format, GPTQ for the integer ones.

``quantize`` returns the real thing (codes + scales + offsets, what the artifact stores);
``simulate`` returns the dequantized weight a model runs with in simulation. The two are
consistent by construction: ``simulate`` is ``quantize(...).dequantize()``.
"""

from __future__ import annotations

from typing import Literal

import torch

from bitalloc.quant.formats import Format, IntFormat, QuantizedTensor
from bitalloc.quant.gptq import gptq_quantize

Method = Literal["rtn", "gptq"]
METHODS: tuple[Method, ...] = ("rtn", "gptq")


def uses_gptq(fmt: Format, method: Method) -> bool:
    """GPTQ applies to integer formats only; the others fall back to round-to-nearest."""
    return method == "gptq" and isinstance(fmt, IntFormat)


def quantize(w: torch.Tensor, fmt: Format, method: Method = "rtn", hessian: torch.Tensor | None = None) -> QuantizedTensor:
    """Quantize a ``[N, K]`` matrix; GPTQ needs the layer's calibration ``hessian``."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; known: {METHODS}")
    if uses_gptq(fmt, method):
        if hessian is None:
            raise ValueError("GPTQ needs the layer's calibration Hessian")
        return gptq_quantize(w, hessian, fmt)
    return fmt.quantize(w)


def simulate(w: torch.Tensor, fmt: Format, method: Method = "rtn", hessian: torch.Tensor | None = None) -> torch.Tensor:
    """The weight as the quantized model sees it, in ``w``'s dtype."""
    if fmt.is_keep:
        return fmt.fake_quantize(w)
    return quantize(w, fmt, method, hessian).dequantize().to(w.dtype)

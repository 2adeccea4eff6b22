"""Quantizers: round-to-nearest for every format, GPTQ for the integer ones (llama.cpp's types:
ggml's own quantizer, with an importance matrix when given).

``quantize`` returns the real thing (codes + scales + offsets, what the artifact stores);
``simulate`` returns the dequantized weight a model runs with in simulation. The two are
consistent by construction: ``simulate`` is ``quantize(...).dequantize()``.
"""

from __future__ import annotations

from typing import Literal

import torch

from bitalloc.quant.formats import Format, GgmlFormat, IntFormat, QuantizedTensor
from bitalloc.quant.gptq import gptq_quantize

Method = Literal["rtn", "gptq"]
"""How weights are rounded: ``rtn`` (round to nearest), or ``gptq``, the calibration-aware method.
``gptq`` is GPTQ for integer formats, and for llama.cpp's types llama.cpp's own calibration-aware
rounding: ggml's quantizer weighted by the importance matrix of the same calibration Hessians
(``llama-quantize --imatrix``); other formats are rounded to nearest."""
METHODS: tuple[Method, ...] = ("rtn", "gptq")


def uses_gptq(fmt: Format, method: Method) -> bool:
    """GPTQ applies to integer formats only; the others fall back to round-to-nearest."""
    return method == "gptq" and isinstance(fmt, IntFormat)


def uses_importance(fmt: Format, method: Method) -> bool:
    """llama.cpp's types take the calibration as an importance matrix under ``gptq``, as llama.cpp does."""
    return method == "gptq" and isinstance(fmt, GgmlFormat)


def quantize(w: torch.Tensor, fmt: Format, method: Method = "rtn", hessian: torch.Tensor | None = None) -> QuantizedTensor:
    """Quantize a ``[N, K]`` matrix; GPTQ needs the layer's calibration ``hessian``."""
    if method not in METHODS:
        raise ValueError(f"unknown quantization method {method!r}; known: {METHODS}")
    if uses_gptq(fmt, method):
        if hessian is None:
            raise ValueError("GPTQ needs the layer's calibration Hessian")
        return gptq_quantize(w, hessian, fmt)
    return fmt.quantize(w)


def simulate(w: torch.Tensor, fmt: Format, method: Method = "rtn", hessian: torch.Tensor | None = None,
             importance: torch.Tensor | None = None) -> torch.Tensor:
    """The weight as the quantized model sees it, in ``w``'s dtype.

    ``importance`` (one weight per input column) is llama.cpp's importance matrix: only ggml's
    types use it, as ``llama-quantize --imatrix`` does (``importance_matrix`` makes it from a Hessian).
    """
    if isinstance(fmt, GgmlFormat):
        return fmt.fake_quantize(w, importance)
    if not fmt.has_codes:
        return fmt.fake_quantize(w)
    return quantize(w, fmt, method, hessian).dequantize().to(w.dtype)


def importance_matrix(hessian: torch.Tensor, tokens: int) -> torch.Tensor:
    """llama.cpp's importance matrix of a layer from its calibration Hessian ``X^T X`` summed over
    ``tokens`` rows: the mean squared activation of each input column (``llama-imatrix``'s
    ``in_sum2 / counts``, divided in float32 as llama-quantize divides it)."""
    return torch.diagonal(hessian).float() / tokens

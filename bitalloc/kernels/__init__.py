"""Triton kernels for quantized linear layers, with the PyTorch reference they are tested against.

Storage convention (shared with ``quant/``): see :mod:`kernels.packing` for the
bit planes and :mod:`kernels.weights` for scales, offsets and fp8. The two
kernels are ``kernels.gemv.gemv`` and ``kernels.gemm.gemm``; ``quant_matmul``
picks between them by batch size. Set ``TRITON_INTERPRET=1`` to run them on CPU.
"""

from bitalloc.kernels.packing import PLANES, pack, packed_nbytes, plane_widths, plane_words, unpack
from bitalloc.kernels.reference import dequantize
from bitalloc.kernels.reference import matmul as reference_matmul
from bitalloc.kernels.weights import Fp8Weight, PackedWeight
from bitalloc.lazy import lazy_exports

_TRITON_EXPORTS = {
    "GEMV_MAX_BATCH": "bitalloc.kernels.gemv",
    "quant_matmul": "bitalloc.kernels.dispatch",
    "QuantLinear": "bitalloc.kernels.quant_linear",
    "Fp8Linear": "bitalloc.kernels.quant_linear",
}

__all__ = [
    "PLANES",
    "Fp8Weight",
    "PackedWeight",
    "dequantize",
    "pack",
    "packed_nbytes",
    "plane_widths",
    "plane_words",
    "reference_matmul",
    "unpack",
    *_TRITON_EXPORTS,
]

# The Triton-backed names load on first use: ``triton.jit`` reads ``TRITON_INTERPRET`` when a
# kernel is defined, so importing ``kernels.packing`` (as ``quant.formats`` does) must not define
# the kernels before a process has had the chance to set it.
__getattr__ = lazy_exports(__name__, globals(), _TRITON_EXPORTS)

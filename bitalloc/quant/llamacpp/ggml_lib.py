"""ggml's own quantizers, called through ctypes on the built ``libggml-base``.

``ggml_quantize_chunk`` (ggml/include/ggml.h) is the very function llama-quantize calls per
tensor, so the blocks it returns are the bytes a GGUF made by llama-quantize holds: the
simulation of a ggml type is exact by construction, not a port. It runs ggml's reference
(CPU-independent) quantizers, and initialises the IQ types' grids itself. The blocks are read
back with the ``gguf`` package's dequantizers.

The call releases the GIL, so large matrices are quantized in row chunks on several threads;
each row's blocks depend only on that row (and the importance matrix), so chunking changes
no byte.
"""

from __future__ import annotations

import ctypes
import functools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from bitalloc.quant.llamacpp.tools import tools

_CHUNK_VALUES = 1 << 20  # about 4 MB of float32 per call


@functools.lru_cache(maxsize=None)
def _library(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    return lib


def library() -> ctypes.CDLL:
    """The built ``libggml-base``; ``ToolsNotBuilt`` saying how to build it when it is not there."""
    return _library(str(tools().library))


def row_bytes(type_name: str, k: int) -> int:
    """Bytes of one row of ``k`` values in a ggml type (``k`` a multiple of its block)."""
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]
    if k % block:
        raise ValueError(f"{type_name} packs rows in blocks of {block}; a row of {k} does not fit")
    return k // block * size


def quantize_rows(type_name: str, rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """``rows`` (float32 ``[N, K]``) as ggml stores them in ``type_name``: uint8 ``[N, row bytes]``.

    ``importance`` is llama.cpp's importance matrix for this tensor: one non-negative weight per
    input column (``[K]``, the mean squared activation), as ``llama-quantize --imatrix`` passes it.
    """
    qtype = GGMLQuantizationType[type_name]
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if rows.ndim != 2:
        raise ValueError(f"expected a [N, K] matrix, got shape {rows.shape}")
    n, k = rows.shape
    out = np.empty((n, row_bytes(type_name, k)), dtype=np.uint8)
    lib = library()
    if importance is not None:
        importance = np.ascontiguousarray(importance, dtype=np.float32)
        if importance.shape != (k,):
            raise ValueError(f"the importance matrix must hold one value per input column ([{k}]), got {importance.shape}")
    elif lib.ggml_quantize_requires_imatrix(qtype.value):
        raise ValueError(f"{type_name} cannot be quantized without an importance matrix")
    imatrix = None if importance is None else importance.ctypes.data
    step = max(1, _CHUNK_VALUES // k)

    def chunk(first: int) -> int:
        count = min(step, n - first)
        return lib.ggml_quantize_chunk(qtype.value, rows[first].ctypes.data, out[first].ctypes.data,
                                       0, count, k, imatrix)

    starts = range(0, n, step)
    with ThreadPoolExecutor(max_workers=min(len(starts), len(os.sched_getaffinity(0)))) as pool:
        written = sum(pool.map(chunk, starts))
    if written != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {written} bytes for {type_name} [{n}, {k}], expected {out.nbytes}")
    return out


def dequantize_rows(type_name: str, blocks: np.ndarray) -> np.ndarray:
    """The float32 ``[N, K]`` values of ggml blocks (uint8 ``[N, row bytes]``), by the ``gguf`` package."""
    return dequantize(blocks, GGMLQuantizationType[type_name]).astype(np.float32, copy=False)

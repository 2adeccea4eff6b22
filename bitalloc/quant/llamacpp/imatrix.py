"""llama.cpp's importance-matrix file, written from bitalloc's calibration Hessians.

``llama-imatrix`` sums the square of each input column of every weight tensor over the
calibration tokens (``<tensor>.in_sum2``) and counts those tokens (``<tensor>.counts``);
``llama-quantize --imatrix`` divides the one by the other in float32 and weighs ggml's rounding
by the quotient. The diagonal of a Hessian ``X^T X`` is that very sum, so the file is written
from the Hessians GPTQ uses, in the GGUF layout of llama.cpp's ``tools/imatrix/imatrix.cpp``
(its ``imatrix.*`` keys and 2-D float32 tensors), and llama-quantize then rounds each tensor as
``GgmlFormat.fake_quantize(w, hessians.importance(unit))`` does.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from gguf import GGUFType, GGUFWriter, Keys

MAX_TOKENS = 2 ** 24
"""llama.cpp stores a count as float32 and rounds it back: exact below this."""


def write_imatrix(path: Path, diagonals: Mapping[str, torch.Tensor], tokens: int, tensors: Mapping[str, str], *,
                  arch: str, dataset: str, chunks: int, chunk_size: int) -> None:
    """Write the entries of ``tensors`` (unit name -> GGUF tensor name, ``blk.0.attn_q.weight``)
    from the diagonals of their units' Hessians, each summed over ``tokens`` calibration tokens
    (``Hessians``: the sum of each input's squares, which is all an importance matrix keeps);
    ``dataset``, ``chunks`` and ``chunk_size`` describe the calibration windows as llama-imatrix
    records its text, chunk count and context."""
    if not 0 < tokens < MAX_TOKENS:
        raise ValueError(f"an importance matrix counts 1 to {MAX_TOKENS - 1} tokens exactly; got {tokens}")
    writer = GGUFWriter(path, arch)
    writer.add_type(GGUFType.IMATRIX)
    writer.add_array(Keys.IMatrix.DATASETS, [dataset])
    writer.add_uint32(Keys.IMatrix.CHUNK_COUNT, chunks)
    writer.add_uint32(Keys.IMatrix.CHUNK_SIZE, chunk_size)
    count = np.full((1, 1), tokens, dtype=np.float32)
    for unit, tensor in sorted(tensors.items(), key=lambda item: item[1]):
        sums = diagonals[unit].float().cpu().numpy()
        writer.add_tensor(f"{tensor}.in_sum2", sums.reshape(1, -1))  # ggml's [K, experts=1]
        writer.add_tensor(f"{tensor}.counts", count)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

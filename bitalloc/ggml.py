"""llama.cpp's tensor types (ggml's): the facts that bitalloc's llama.cpp baselines and its
llama.cpp export share, in one place.

Block sizes come from the ``gguf`` package (``GGML_QUANT_SIZES``, which mirrors the block
structs in ``ggml/src/ggml-common.h``). ``FALLBACK`` is ``tensor_type_fallback`` in
``src/llama-quant.cpp``: a k-quant (and IQ4_XS) packs rows in 256-element super-blocks, so a
tensor whose row length is not a multiple of 256 is written in the 32-element type beside it.
This module imports no torch, so ``search`` may use it.
"""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL",
         "F16", "BF16", "F32")
"""The types llama-quantize's k-quant mixes and their fallbacks write."""

FALLBACK: dict[str, str] = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
                            "IQ4_XS": "IQ4_NL"}


def block(name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type, e.g. ``Q4_K`` -> (256, 144)."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[name]]


def bits_per_weight(name: str) -> float:
    weights, nbytes = block(name)
    return 8.0 * nbytes / weights


def fits(name: str, row: int) -> bool:
    """Whether rows of ``row`` elements hold whole blocks of this type."""
    return row % block(name)[0] == 0

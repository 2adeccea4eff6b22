"""llama.cpp's tensor types (ggml's): the facts that bitalloc's llama.cpp baselines and its
llama.cpp export share, in one place.

Block sizes come from the ``gguf`` package (``GGML_QUANT_SIZES``, which mirrors the block
structs in ``ggml/src/ggml-common.h``). ``FALLBACK`` is ``tensor_type_fallback`` in
``src/llama-quant.cpp``: a k-quant (and IQ4_XS) packs rows in 256-element super-blocks, so a
tensor whose row length is not a multiple of 256 is written in the 32-element type beside it.
IQ3_S (a 256-block IQ type) falls back to IQ4_NL as IQ4_XS does; a 32-block type has nothing
smaller to fall back to, and a row that even 32 does not divide is written F16.

``FORMATS`` are the types bitalloc offers as candidate formats, named in lower case (``q4_k``):
those llama-quantize writes for a tensor named by ``--tensor-type`` without an importance
matrix (it refuses IQ3_XXS, IQ2_* and IQ1_* without one; TQ1_0/TQ2_0 are for ternary models).
This module imports no torch, so ``search`` may use it.
"""

from __future__ import annotations

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_XS", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "IQ4_NL",
         "F16", "BF16", "F32")
"""The types llama-quantize's k-quant mixes and their fallbacks write."""

FALLBACK: dict[str, str] = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
                            "IQ4_XS": "IQ4_NL", "IQ3_S": "IQ4_NL"}

FORMATS = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_XS", "IQ4_NL",
           "IQ3_S", "MXFP4")
"""The types offered as candidate formats (by their lower-case names)."""


def block(name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type, e.g. ``Q4_K`` -> (256, 144)."""
    return GGML_QUANT_SIZES[GGMLQuantizationType[name]]


def bits_per_weight(name: str) -> float:
    weights, nbytes = block(name)
    return 8.0 * nbytes / weights


def fits(name: str, row: int) -> bool:
    """Whether rows of ``row`` elements hold whole blocks of this type."""
    return row % block(name)[0] == 0


def stored_type(name: str, row: int) -> str:
    """The type llama-quantize writes when asked for ``name`` on rows of ``row`` elements
    (``tensor_type_fallback``): ``name`` itself, its fallback, or F16."""
    if fits(name, row):
        return name
    fallback = FALLBACK.get(name, name if block(name)[0] <= 32 else None)
    if fallback is None:
        raise ValueError(f"no tensor type fallback is defined for {name} (row length {row})")
    return fallback if fits(fallback, row) else "F16"


def format_type(format_name: str) -> str | None:
    """The ggml type a candidate format name stands for (``q4_k`` -> ``Q4_K``), or None for bitalloc's own."""
    name = format_name.upper()
    return name if name in FORMATS else None

"""Hugging Face module names -> the names llama.cpp gives the same tensors in a GGUF file.

llama.cpp's converter (``convert_hf_to_gguf.py``, through gguf-py's ``TensorNameMap``)
renames every tensor: ``model.layers.3.self_attn.q_proj.weight`` becomes
``blk.3.attn_q.weight``. Per-tensor rules for ``llama-quantize`` are written against the GGUF
names, so an allocation made on the Hugging Face module names has to be translated first.

The table covers the dense decoder families whose names are unambiguous without knowing the
architecture: Llama and its kin (Mistral, Qwen2, Gemma, Phi-3's fused ``qkv_proj`` /
``gate_up_proj``), GPT-2, Falcon and GPT-NeoX. A name it does not know gives ``None``;
callers refuse rather than guess (tests check the table against gguf-py's own map).
"""

from __future__ import annotations

import re
from typing import NamedTuple

# "<parent>.<leaf>" inside a block -> the GGUF tensor kind.
_BLOCK_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.qkv_proj": "attn_qkv",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "mlp.gate_up_proj": "ffn_up",  # llama.cpp keeps Phi-3's fused gate+up as one ffn_up tensor
    "attn.c_attn": "attn_qkv",  # GPT-2
    "attn.c_proj": "attn_output",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
    "self_attention.query_key_value": "attn_qkv",  # Falcon
    "self_attention.dense": "attn_output",
    "attention.query_key_value": "attn_qkv",  # GPT-NeoX
    "attention.dense": "attn_output",
    "mlp.dense_h_to_4h": "ffn_up",
    "mlp.dense_4h_to_h": "ffn_down",
}
# Whole-model tensors outside the blocks.
_TOP_TENSORS = {
    "model.embed_tokens": "token_embd",
    "transformer.wte": "token_embd",
    "transformer.word_embeddings": "token_embd",
    "gpt_neox.embed_in": "token_embd",
    "lm_head": "output",
    "embed_out": "output",
}
_BLOCK = re.compile(r"(?:model|transformer|gpt_neox)\.(?:layers|h)\.(\d+)\.(.+)")


class GGUFTensor(NamedTuple):
    """A tensor's GGUF identity: ``name`` (``blk.3.attn_q``), ``kind`` (``attn_q``), ``block`` (3)."""

    name: str
    kind: str
    block: int | None


def gguf_tensor(hf_name: str) -> GGUFTensor | None:
    """The GGUF tensor a Hugging Face module (or its ``.weight``) becomes; ``None`` if unknown."""
    name = hf_name.removesuffix(".weight")
    if name in _TOP_TENSORS:
        kind = _TOP_TENSORS[name]
        return GGUFTensor(kind, kind, None)
    match = _BLOCK.fullmatch(name)
    if match is None or match[2] not in _BLOCK_TENSORS:
        return None
    block, kind = int(match[1]), _BLOCK_TENSORS[match[2]]
    return GGUFTensor(f"blk.{block}.{kind}", kind, block)


def gguf_name(hf_name: str) -> str | None:
    """``model.layers.3.self_attn.q_proj`` -> ``blk.3.attn_q`` (without the ``.weight`` suffix)."""
    tensor = gguf_tensor(hf_name)
    return None if tensor is None else tensor.name


def gguf_kind(hf_name: str) -> str | None:
    """``model.layers.3.mlp.down_proj`` -> ``ffn_down``; ``lm_head`` -> ``output``."""
    tensor = gguf_tensor(hf_name)
    return None if tensor is None else tensor.kind


def gguf_block(hf_name: str) -> int | None:
    """The block index of a GGUF block tensor; ``None`` for whole-model tensors and unknown names."""
    tensor = gguf_tensor(hf_name)
    return None if tensor is None else tensor.block


def tensor_type_pattern(gguf: str) -> str:
    """The ``llama-quantize --tensor-type`` pattern that selects exactly one tensor.

    llama.cpp matches these patterns with ``std::regex_search`` (anywhere in the name), so the
    pattern is anchored at the start: ``blk.1.attn_q`` would otherwise also hit
    ``blk.11.attn_q``. It stops at the kind rather than at ``.weight$`` because some
    llama-quantize builds (2025) accept a pattern only when its last dotted component is a
    known tensor kind; the kinds in this module's table never prefix one another within an
    architecture they can name (a model has ``attn_q`` or ``attn_qkv``, not both).
    """
    return "^" + re.escape(gguf)

"""Hugging Face -> GGUF tensor names, checked against gguf-py's own map (what convert_hf_to_gguf.py uses)."""

from __future__ import annotations

import re

import gguf
import pytest

from bitalloc.quant.gguf_names import gguf_block, gguf_kind, gguf_name, gguf_tensor, tensor_type_pattern

BLOCK_NAMES = {
    gguf.MODEL_ARCH.LLAMA: ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"],
    gguf.MODEL_ARCH.PHI3: ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"],
    gguf.MODEL_ARCH.GPT2: ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    gguf.MODEL_ARCH.FALCON: ["self_attention.query_key_value", "self_attention.dense", "mlp.dense_h_to_4h",
                             "mlp.dense_4h_to_h"],
    gguf.MODEL_ARCH.GPTNEOX: ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h",
                              "mlp.dense_4h_to_h"],
}
PREFIX = {gguf.MODEL_ARCH.LLAMA: "model.layers", gguf.MODEL_ARCH.PHI3: "model.layers",
          gguf.MODEL_ARCH.GPT2: "transformer.h", gguf.MODEL_ARCH.FALCON: "transformer.h",
          gguf.MODEL_ARCH.GPTNEOX: "gpt_neox.layers"}
TOP_NAMES = {gguf.MODEL_ARCH.LLAMA: ["model.embed_tokens", "lm_head"], gguf.MODEL_ARCH.GPT2: ["transformer.wte"],
             gguf.MODEL_ARCH.FALCON: ["transformer.word_embeddings", "lm_head"],
             gguf.MODEL_ARCH.GPTNEOX: ["gpt_neox.embed_in", "embed_out"]}


@pytest.mark.parametrize("arch", list(BLOCK_NAMES), ids=lambda a: a.name)
def test_names_agree_with_gguf_py_for_each_architecture(arch):
    reference = gguf.get_tensor_name_map(arch, 12)
    names = [f"{PREFIX[arch]}.{block}.{leaf}" for block in (0, 7, 11) for leaf in BLOCK_NAMES[arch]]
    names += TOP_NAMES.get(arch, [])
    for name in names:
        assert gguf_name(name) == reference.get_name(name), name
        assert gguf_name(f"{name}.weight") == gguf_name(name)


def test_kind_and_block_of_the_real_smollm2_units(smollm2_units):
    mapped = {u.name: gguf_tensor(u.name) for u in smollm2_units.weights}
    assert None not in mapped.values()
    assert len({t.name for t in mapped.values()}) == len(mapped) == 30 * 7
    assert gguf_name("model.layers.3.self_attn.q_proj") == "blk.3.attn_q"
    assert gguf_kind("model.layers.29.mlp.down_proj") == "ffn_down" and gguf_block("model.layers.29.mlp.down_proj") == 29
    assert gguf_kind("lm_head") == "output" and gguf_block("lm_head") is None
    assert all(t.block == u.block for u, t in zip(smollm2_units.weights, mapped.values()))


@pytest.mark.parametrize("name", ["features.0", "classifier", "model.layers.0.block_sparse_moe.experts.0.w1",
                                  "model.layers.0.self_attn.q_a_proj", "model.layers.x.self_attn.q_proj",
                                  "encoder.layers.0.self_attn.q_proj"])
def test_unknown_names_give_none(name):
    assert gguf_tensor(name) is None and gguf_name(name) is None and gguf_kind(name) is None


def test_patterns_select_exactly_their_tensor_and_pass_old_llama_quantize_checks():
    names = [f"blk.{b}.{kind}.weight" for b in range(30) for kind in ("attn_q", "attn_k", "attn_output", "ffn_up")]
    for target in ("blk.1.attn_q", "blk.11.attn_q", "blk.2.ffn_up"):
        pattern = tensor_type_pattern(target)
        assert [n for n in names if re.search(pattern, n)] == [f"{target}.weight"]
        assert pattern.rpartition(".")[2] == target.rpartition(".")[2]  # 2025 builds check the last component

"""The llama.cpp export: a runnable script whose --tensor-type rules give every GGUF tensor its ggml type."""

from __future__ import annotations

import os
import re
import stat
import subprocess

import gguf
import pytest

from bitalloc.quant.export import ExportError, export_allocation
from bitalloc.quant.export.llama_cpp import ggml_type_for
from bitalloc.quant.formats import get_format
from bitalloc.quant.kv import KVOptions
from bitalloc.quant.units import Unit

T = gguf.GGMLQuantizationType
# The tensors of a dense Llama GGUF (SmolLM2's), by gguf-py's names.
BLOCK_TENSORS = [gguf.MODEL_TENSOR.ATTN_NORM, gguf.MODEL_TENSOR.ATTN_Q, gguf.MODEL_TENSOR.ATTN_K,
                 gguf.MODEL_TENSOR.ATTN_V, gguf.MODEL_TENSOR.ATTN_OUT, gguf.MODEL_TENSOR.FFN_NORM,
                 gguf.MODEL_TENSOR.FFN_GATE, gguf.MODEL_TENSOR.FFN_UP, gguf.MODEL_TENSOR.FFN_DOWN]


def gguf_tensor_names(blocks: int) -> list[str]:
    names = [gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.TOKEN_EMBD] + ".weight"]
    names += [gguf.TENSOR_NAMES[t].format(bid=b) + ".weight" for b in range(blocks) for t in BLOCK_TENSORS]
    return names + [gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.OUTPUT_NORM] + ".weight"]


def run_script(script: bytes, tmp_path) -> list[str]:
    """Run the exported script with a stand-in llama-quantize that prints its arguments, one per line."""
    stub = tmp_path / "llama-quantize"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    path = tmp_path / "quantize.sh"
    path.write_bytes(script)
    done = subprocess.run(["sh", str(path), "in.gguf", "out.gguf", "4"], capture_output=True, text=True, check=True,
                          env={**os.environ, "LLAMA_QUANTIZE": str(stub)})
    return done.stdout.splitlines()


def llama_cpp_types(argv: list[str], tensors: list[str]) -> dict[str, str]:
    """What llama-quantize does with these arguments: per quantizable tensor, the first --tensor-type pattern
    that ``regex_search``-es its name wins; token_embd follows --token-embedding-type."""
    rules = [argv[i + 1].rsplit("=", 1) for i, a in enumerate(argv) if a == "--tensor-type"]
    chosen = {}
    for name in tensors:
        if name.endswith("_norm.weight"):
            continue  # llama.cpp never quantizes norms
        if name == "token_embd.weight":
            chosen[name] = argv[argv.index("--token-embedding-type") + 1]
            continue
        chosen[name] = next((qtype for pattern, qtype in rules if re.search(pattern, name)), "UNMATCHED")
    return chosen


def test_smollm2_script_runs_and_gives_every_tensor_its_type_with_the_256_fallback(smollm2_units, tmp_path):
    formats = {u.name: ("int4_g128" if u.kind == "weight" else "bf16") for u in smollm2_units.units}
    formats["model.layers.4.mlp.down_proj"] = "int6_g64"
    formats["model.layers.5.mlp.down_proj"] = "bf16"
    formats["model.layers.6.self_attn.v_proj"] = "int8_g32"
    exported = export_allocation("llama.cpp", formats, smollm2_units.units, smollm2_units.tie_groups,
                                 {"model": "zoo:llm", "point_id": 3}, kv=KVOptions())
    assert exported.filename == "llama-quantize.sh" and exported.data.startswith(b"#!/bin/sh\n")
    argv = run_script(exported.data, tmp_path)
    assert argv[0] == "--pure" and argv[-4:] == ["in.gguf", "out.gguf", "Q5_0", "4"]  # q5_0 covers most bytes
    types = llama_cpp_types(argv, gguf_tensor_names(30))
    assert types.pop("token_embd.weight") == "f16"
    assert "UNMATCHED" not in types.values() and len(types) == 210
    assert types["blk.0.ffn_down.weight"] == "q4_K"  # K = 1536 = 6 x 256: the k-quant fits
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_up.weight"] == "q5_0"  # K = 576: llama.cpp's fallback
    assert types["blk.4.ffn_down.weight"] == "q6_K" and types["blk.5.ffn_down.weight"] == "bf16"
    assert types["blk.6.attn_v.weight"] == "q8_0"
    assert "q4_K falls back (K=576 is not a multiple of 256)" in exported.data.decode()
    assert "--output-tensor-type" in argv and "# model: zoo:llm, point_id: 3" in exported.data.decode()


@pytest.mark.parametrize("format_name, k, expected, fell_back", [
    ("int2_g128", 1536, T.Q2_K, None), ("int2_g128", 576, T.Q4_0, T.Q2_K),
    ("int3_pc", 576, T.Q4_0, T.Q3_K), ("int4_g32_asym", 1536, T.Q4_K, None), ("int4_g128", 576, T.Q5_0, T.Q4_K),
    ("int5_g64", 576, T.Q5_1, T.Q5_K), ("int6_g32", 576, T.Q8_0, T.Q6_K), ("int8_pc", 576, T.Q8_0, None),
    ("nf4_g64", 1536, T.IQ4_XS, None), ("nf4_g64", 576, T.IQ4_NL, T.IQ4_XS), ("fp4_e2m1", 576, T.MXFP4, None),
    ("fp8_e4m3", 576, T.Q8_0, None), ("fp6_e3m2", 1536, T.Q6_K, None), ("bf16", 100, T.BF16, None),
])
def test_format_to_ggml_type_table(format_name, k, expected, fell_back):
    chosen = ggml_type_for(get_format(format_name), k)
    assert (chosen.qtype, chosen.fallback_from) == (expected, fell_back)


def test_rows_no_quantized_type_fits_and_unknown_modules_are_refused_together():
    units = [Unit("model.layers.0.mlp.down_proj", "weight", (64, 100), 0),
             Unit("model.layers.0.mlp.up_proj", "weight", (100, 64), 0),
             Unit("features.0", "weight", (16, 9))]
    formats = {"model.layers.0.mlp.down_proj": "int4_g32", "model.layers.0.mlp.up_proj": "int4_g32",
               "features.0": "int8_pc"}
    with pytest.raises(ExportError) as caught:
        export_allocation("llama.cpp", formats, units, [], {})
    message = str(caught.value)
    assert "int4_g32: K is not a multiple of 32, so no quantized ggml type fits its rows" in message
    assert "model.layers.0.mlp.down_proj (K=100)" in message and "up_proj" not in message
    assert "no GGUF tensor name is known for this module (quant/gguf_names.py): features.0" in message


def test_kv_caches_become_runtime_flags_when_uniform_and_are_refused_otherwise(smollm2_units):
    weights = {u.name: "int8_pc" for u in smollm2_units.weights}
    keys = [u.name for u in smollm2_units.units if u.kind == "kv_key"]
    values = [u.name for u in smollm2_units.units if u.kind == "kv_value"]
    uniform = {**weights, **dict.fromkeys(keys, "int8_g64"), **dict.fromkeys(values, "int4_g32_asym")}
    script = export_allocation("llama.cpp", uniform, smollm2_units.units, smollm2_units.tie_groups, {},
                               kv=KVOptions()).data.decode()
    assert "# Run it with (llama-cli / llama-server): --cache-type-k q8_0 --cache-type-v q4_1 --flash-attn on" in script
    varied = {**uniform, keys[3]: "int4_g64", values[0]: "int3_g64"}
    with pytest.raises(ExportError) as caught:
        export_allocation("llama.cpp", varied, smollm2_units.units, smollm2_units.tie_groups, {}, kv=KVOptions())
    message = str(caught.value)
    assert "keys in int4_g64, int8_g64: llama.cpp sets one --cache-type-k for every layer" in message
    assert "values in int3_g64, int4_g32_asym: llama.cpp sets one --cache-type-v for every layer" in message
    three_bit = {**weights, **dict.fromkeys(keys, "int3_g64"), **dict.fromkeys(values, "bf16")}
    with pytest.raises(ExportError, match="int3_g64 KV cache: llama.cpp's cache types are .* none 3-bit"):
        export_allocation("llama.cpp", three_bit, smollm2_units.units, smollm2_units.tie_groups, {}, kv=KVOptions())


def test_an_all_16_bit_allocation_has_nothing_to_quantize(smollm2_units):
    keep = {u.name: "bf16" for u in smollm2_units.units}
    with pytest.raises(ExportError, match="nothing for llama-quantize to do"):
        export_allocation("llama.cpp", keep, smollm2_units.units, smollm2_units.tie_groups, {}, kv=KVOptions())

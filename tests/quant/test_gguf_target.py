"""``--target gguf``: a GGUF made by llama.cpp's own converter and llama-quantize, whose every tensor
has the type the allocation says (read back with ``gguf``, independently of the build's own check)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader

from bitalloc.quant.artifact import ArtifactError
from bitalloc.quant.formats import get_format
from bitalloc.quant.llamacpp import tools
from bitalloc.quant.loading import LoadedModel, load_model
from bitalloc.quant.targets import BuildRequest, build_target
from bitalloc.quant.units import weight_units

pytestmark = pytest.mark.skipif(tools.find() is None, reason="llama.cpp's tools are not built (bitalloc llamacpp build)")


@pytest.fixture(scope="module")
def small_llama(zoo) -> LoadedModel:
    """A random Llama whose rows (256 and 512 wide) hold k-quant super-blocks, but for one short layer."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bitalloc.quant.zoo import zoo_model_dir

    tokenizer = AutoTokenizer.from_pretrained(zoo_model_dir("llm"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=544, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    return LoadedModel("test:small-llama", LlamaForCausalLM(config).eval(), tokenizer, None,
                       {"architecture": "LlamaForCausalLM"})


def test_a_gguf_holds_every_tensor_in_the_type_the_allocation_says(small_llama, tmp_path):
    cycle = ["q4_k", "q6_k", "q8_0", "q5_0", "iq4_xs", "int4_g32"]
    units = weight_units(small_llama.module, exclude=("lm_head",))
    allocation = {unit.name: cycle[i % len(cycle)] for i, unit in enumerate(units)}
    built = build_target("gguf", BuildRequest(small_llama, allocation, tmp_path / "out"))

    reader = GGUFReader(built.path / "model.gguf")
    types = {t.name: GGMLQuantizationType(t.tensor_type).name for t in reader.tensors}
    expected = {"q4_k": "Q4_K", "q6_k": "Q6_K", "q8_0": "Q8_0", "q5_0": "Q5_0", "iq4_xs": "IQ4_XS",
                "int4_g32": "Q4_K"}  # a bitalloc format: the export's nearest ggml type
    short = {"q4_k": "Q5_0", "q6_k": "Q8_0", "iq4_xs": "IQ4_NL", "int4_g32": "Q5_0"}  # llama.cpp's fallbacks
    for unit in units:
        block, kind = unit.name.split(".")[2], {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v",
                                                "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
                                                "down_proj": "ffn_down"}[unit.name.split(".")[-1]]
        want = allocation[unit.name]
        rows_fit = unit.shape[1] % 256 == 0
        assert types[f"blk.{block}.{kind}.weight"] == (expected[want] if rows_fit else short.get(want, expected[want]))
    assert not all(u.shape[1] % 256 == 0 for u in units)  # down_proj's 544-wide rows exercise the fallback
    assert types["token_embd.weight"] == "F16"  # not a unit: kept 16-bit, as bitalloc counts it

    summary = json.loads((built.path / "bitalloc_gguf.json").read_text())
    assert summary["types"] == types and built.summary["bytes"]["file"] == (built.path / "model.gguf").stat().st_size
    script = (built.path / "llama-quantize.sh").read_text()
    assert "--tensor-type" in script and "--pure" in script


def test_the_ggml_blocks_in_the_file_are_the_ones_bitalloc_simulated(small_llama, tmp_path):
    """The profile's simulation of a ggml type and llama-quantize's file agree value for value."""
    unit = next(u for u in weight_units(small_llama.module) if u.name.endswith("layers.0.mlp.up_proj"))
    allocation = {unit.name: "q4_k"}
    built = build_target("gguf", BuildRequest(small_llama, allocation, tmp_path / "out"))
    tensor = next(t for t in GGUFReader(built.path / "model.gguf").tensors if t.name == "blk.0.ffn_up.weight")
    from gguf.quants import dequantize

    in_file = dequantize(np.asarray(tensor.data), GGMLQuantizationType(tensor.tensor_type)).reshape(unit.shape)
    weight = small_llama.module.get_submodule(unit.name).weight.detach()
    simulated = get_format("q4_k").fake_quantize(weight.float())
    assert np.array_equal(in_file, simulated.numpy())


@pytest.mark.slow
def test_with_gptq_llama_quantize_rounds_by_the_importance_matrix_the_simulation_used(small_llama, tmp_path):
    """method gptq: llama-quantize --imatrix of the calibration Hessians writes exactly the blocks of
    ``fake_quantize(w, importance)``, and not the plain ones (an rtn build's, as the test above shows)."""
    from gguf.quants import dequantize

    from bitalloc.quant.calibration import CalibrationSet
    from bitalloc.quant.hessian import calibration_hessians
    from bitalloc.quant.units import enumerate_units

    generator = torch.Generator().manual_seed(1)
    calibration = CalibrationSet(torch.randint(len(small_llama.tokenizer), (3, 24), generator=generator),
                                 "test:random", "0" * 64)
    # not q_proj / k_proj: the converter permutes their rows (llama.cpp's rope layout)
    allocation = {"model.layers.0.self_attn.v_proj": "q4_0", "model.layers.0.self_attn.o_proj": "q3_k",
                  "model.layers.0.mlp.up_proj": "q4_k", "model.layers.1.mlp.down_proj": "q5_0"}
    gptq = build_target("gguf", BuildRequest(small_llama, allocation, tmp_path / "gptq", method="gptq",
                                             calibration=calibration))

    units = enumerate_units(small_llama.module, include=sorted(allocation), exclude=())
    hessians = calibration_hessians(small_llama.module, units, calibration)
    imatrix = {t.name: np.asarray(t.data) for t in GGUFReader(gptq.path / "imatrix.gguf").tensors}
    names = {"model.layers.0.self_attn.v_proj": "blk.0.attn_v", "model.layers.0.self_attn.o_proj": "blk.0.attn_output",
             "model.layers.0.mlp.up_proj": "blk.0.ffn_up", "model.layers.1.mlp.down_proj": "blk.1.ffn_down"}
    # llama-imatrix's mean squared activation, from the modules' inputs directly
    inputs = {}
    hooks = [small_llama.module.get_submodule(name).register_forward_pre_hook(
        lambda m, a, name=name: inputs.setdefault(name, a[0])) for name in allocation]
    with torch.no_grad():
        small_llama.module(calibration.inputs)
    for hook in hooks:
        hook.remove()
    in_file = {t.name: t for t in GGUFReader(gptq.path / "model.gguf").tensors}
    differs = []
    for unit in units.weights:
        name = names[unit.name]
        importance = hessians.importance(unit.name)
        assert torch.allclose(importance, (inputs[unit.name].reshape(-1, unit.shape[1]) ** 2).mean(dim=0), rtol=1e-4)
        assert imatrix[f"{name}.weight.counts"].item() == calibration.samples
        assert np.array_equal(imatrix[f"{name}.weight.in_sum2"].ravel() / np.float32(calibration.samples),
                              importance.numpy())

        weight = small_llama.module.get_submodule(unit.name).weight.detach().float()
        tensor = in_file[f"{name}.weight"]
        blocks = dequantize(np.asarray(tensor.data), GGMLQuantizationType(tensor.tensor_type)).reshape(unit.shape)
        fmt = get_format(allocation[unit.name])
        assert np.array_equal(blocks, fmt.fake_quantize(weight, importance).numpy())
        differs.append(not np.array_equal(blocks, fmt.fake_quantize(weight).numpy()))
    assert all(differs)  # the importance matrix was really applied, to every tensor


def test_a_gguf_build_refuses_gptq_without_calibration_and_units_llama_cpp_cannot_name(small_llama, tmp_path):
    unit = weight_units(small_llama.module)[0]
    with pytest.raises(ArtifactError, match="calibration"):
        build_target("gguf", BuildRequest(small_llama, {unit.name: "q4_k"}, tmp_path / "a", method="gptq"))
    with pytest.raises(ArtifactError, match="does not have"):
        build_target("gguf", BuildRequest(small_llama, {"model.layers.9.mlp.up_proj": "q4_k"}, tmp_path / "b"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_streamed_model_builds_the_gguf_the_whole_model_builds(small_llama, method, tmp_path):
    """Converted from the checkpoint itself, its imatrix summed block by block: the same tensors,
    and an importance matrix equal to the whole model's."""
    from bitalloc.quant.calibration import calibration_for
    from bitalloc.quant.stream import open_streamed

    folder = tmp_path / "model"
    small_llama.module.save_pretrained(folder, max_shard_size="1MB")
    small_llama.tokenizer.save_pretrained(folder)
    whole = load_model(str(folder))
    streamed = open_streamed(folder, str(folder), torch.float32, torch.device("cpu"))
    calibration = calibration_for(whole, None, seq_len=32, count=4) if method == "gptq" else None
    units = weight_units(whole.module, exclude=("lm_head",))
    allocation = {unit.name: ["q4_k", "q8_0", "q6_k"][i % 3] for i, unit in enumerate(units)}
    built = [build_target("gguf", BuildRequest(m, allocation, tmp_path / name, method=method, calibration=calibration))
             for name, m in (("whole", whole), ("streamed", streamed))]

    readers = [GGUFReader(b.path / "model.gguf") for b in built]
    types = [{t.name: GGMLQuantizationType(t.tensor_type).name for t in r.tensors} for r in readers]
    assert types[0] == types[1]
    if method == "rtn":
        assert built[0].summary["sha256"] == built[1].summary["sha256"]  # byte for byte the same file
        return
    imatrices = [{t.name: np.asarray(t.data) for t in GGUFReader(b.path / "imatrix.gguf").tensors} for b in built]
    assert imatrices[0].keys() == imatrices[1].keys() and len(imatrices[0]) == 2 * len(units)
    for name, values in imatrices[0].items():
        np.testing.assert_allclose(imatrices[1][name], values, rtol=1e-4, err_msg=name)

"""compressed-tensors checkpoints: loaded back by transformers + compressed-tensors, they compute bitalloc's simulation."""

from __future__ import annotations

import json

import pytest
import torch
from compressed_tensors.quantization import QuantizationConfig
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from bitalloc.quant.artifact import ArtifactError, write_checkpoint
from bitalloc.quant.artifact import compressed_tensors as checkpoint_module
from bitalloc.quant.calibration import calibration_tokens, evaluation_tokens
from bitalloc.quant.export import export_allocation
from bitalloc.quant.formats import IntFormat, get_format
from bitalloc.quant.hessian import calibration_hessians
from bitalloc.quant.simulation import applied
from bitalloc.quant.units import enumerate_units

# The tiny Llama's rows are 64 long (160 for down_proj), so its groups are 32 or 64 (int4_g128 needs K % 128 == 0).
# Layer 1's q/k/v are left out: they must come back exactly as the model has them.
ALLOCATION = {
    "model.layers.0.self_attn.q_proj": "int4_g32", "model.layers.0.self_attn.k_proj": "int4_g32",
    "model.layers.0.self_attn.v_proj": "int4_g32", "model.layers.0.self_attn.o_proj": "int8_pc",
    "model.layers.0.mlp.gate_proj": "int4_g64", "model.layers.0.mlp.up_proj": "int4_g64",
    "model.layers.0.mlp.down_proj": "bf16",
    "model.layers.1.self_attn.o_proj": "fp8_e4m3",
    "model.layers.1.mlp.gate_proj": "int8_g32", "model.layers.1.mlp.up_proj": "int8_g32",
    "model.layers.1.mlp.down_proj": "int4_g32",  # K = 160: five groups
}
LEFT_OUT = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"]


def load(path) -> torch.nn.Module:
    """The checkpoint as transformers loads it (compressed-tensors decompresses it on the first forward pass)."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def tokens(model) -> torch.Tensor:
    return evaluation_tokens(model.tokenizer, "zoo:evaluation", seq_len=32, max_windows=2).inputs


@pytest.fixture(scope="module")
def checkpoint(tiny_llama, tmp_path_factory):
    return write_checkpoint(tiny_llama, ALLOCATION, tmp_path_factory.mktemp("ct") / "checkpoint")


@pytest.fixture(scope="module")
def loaded(checkpoint, tiny_llama):
    module = load(checkpoint.path)
    with torch.no_grad():
        module(tokens(tiny_llama)[:1])  # decompresses every unit
    return module


def test_its_logits_equal_bitalloc_simulation_of_the_allocation(tiny_llama, loaded):
    batch = tokens(tiny_llama)
    with torch.no_grad():
        got = loaded(batch).logits
        reference = tiny_llama.module(batch).logits
        with applied(tiny_llama, ALLOCATION):
            simulated = tiny_llama.module(batch).logits
    # Measured: identical (max difference 0.0); the tolerance leaves room for a change of summation order only.
    torch.testing.assert_close(got, simulated, rtol=0, atol=1e-5)
    assert (got - reference).abs().max() > 1e-2  # the allocation changes the model


def test_every_unit_decompresses_to_bitalloc_fake_quantized_weight_exactly(tiny_llama, loaded):
    original, modules = dict(tiny_llama.module.named_modules()), dict(loaded.named_modules())
    for name, format_name in ALLOCATION.items():
        weight = original[name].weight.detach()
        assert torch.equal(modules[name].weight, get_format(format_name).fake_quantize(weight)), (name, format_name)
    for name in LEFT_OUT:
        assert torch.equal(modules[name].weight, original[name].weight)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_the_tensors_are_bitalloc_scales_in_compressed_tensors_layout(tiny_llama, checkpoint):
    original = dict(tiny_llama.module.named_modules())
    with safe_open(checkpoint.path / "model.safetensors", "pt") as stored:
        assert stored.metadata() == {"format": "pt"}
        names = set(stored.keys())
        for name, format_name in ALLOCATION.items():
            fmt, weight = get_format(format_name), original[name].weight.detach()
            if fmt.is_keep:
                assert stored.get_tensor(f"{name}.weight").dtype == fmt.dtype
                continue
            scale = stored.get_tensor(f"{name}.weight_scale")
            assert torch.equal(scale, fmt.quantize(weight).scales)  # float16, bitalloc's own
            if isinstance(fmt, IntFormat):
                packed = stored.get_tensor(f"{name}.weight_packed")
                assert packed.dtype == torch.int32 and packed.shape == (weight.shape[0], weight.shape[1] * fmt.bits // 32)
                assert stored.get_tensor(f"{name}.weight_shape").tolist() == list(weight.shape)
                assert f"{name}.weight" not in names
            else:
                assert stored.get_tensor(f"{name}.weight").dtype == torch.float8_e4m3fn
        assert "lm_head.weight" not in names  # tied to the embeddings, stored once


def test_the_config_holds_the_exported_groups_marked_compressed(tiny_llama, checkpoint):
    config = json.loads((checkpoint.path / "config.json").read_text())["quantization_config"]
    parsed = QuantizationConfig.model_validate(config)
    assert parsed.quant_method == "compressed-tensors" and parsed.quantization_status == "compressed"
    units = enumerate_units(tiny_llama.module, example_inputs=tiny_llama.example_inputs)
    exported = json.loads(export_allocation("compressed-tensors", {**dict.fromkeys(LEFT_OUT, "bf16"), **ALLOCATION},
                                            units.units, units.tie_groups).data)
    assert parsed.config_groups == QuantizationConfig.model_validate(exported).config_groups
    assert sorted(parsed.ignore) == sorted(exported["ignore"]) and set(LEFT_OUT) <= set(parsed.ignore)
    assert checkpoint.formats == ["naive-quantized", "pack-quantized"]
    on_disk = {p.name: p.stat().st_size for p in checkpoint.path.iterdir()}
    assert checkpoint.files == on_disk and checkpoint.bytes == sum(on_disk.values())
    assert {"config.json", "generation_config.json", "tokenizer.json", "model.safetensors"} <= set(on_disk)
    modes = {(checkpoint.path / name).stat().st_mode for name in on_disk}
    assert len(modes) == 1  # the weights are as readable as the config (safetensors alone writes owner-only files)


@pytest.mark.slow
def test_gptq_codes_are_written_as_gptq_simulated_them(tiny_llama, tmp_path):
    allocation = {name: fmt for name, fmt in ALLOCATION.items() if fmt.startswith("int")}
    calibration = calibration_tokens(tiny_llama.tokenizer, "zoo:evaluation", seq_len=32, count=4)
    units = enumerate_units(tiny_llama.module, include=list(allocation), exclude=(), example_inputs=tiny_llama.example_inputs)
    hessians = calibration_hessians(tiny_llama.module, units, calibration)
    written = write_checkpoint(tiny_llama, allocation, tmp_path / "gptq", method="gptq", calibration=calibration,
                               hessians=hessians)
    batch = tokens(tiny_llama)
    with torch.no_grad():
        got = load(written.path)(batch).logits
        with applied(tiny_llama, allocation, method="gptq", hessians=hessians):
            simulated = tiny_llama.module(batch).logits
        with applied(tiny_llama, allocation):
            rtn = tiny_llama.module(batch).logits
    torch.testing.assert_close(got, simulated, rtol=0, atol=1e-5)
    assert (got - rtn).abs().max() > 1e-3  # GPTQ really ran


def test_a_large_model_is_sharded_with_an_index_that_transformers_follows(tiny_llama, checkpoint, monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint_module, "MAX_SHARD", "4MB")
    sharded = write_checkpoint(tiny_llama, ALLOCATION, tmp_path / "sharded")
    index = json.loads((sharded.path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((sharded.path / shard).is_file() for shard in shards)
    batch = tokens(tiny_llama)
    with torch.no_grad():
        assert torch.equal(load(sharded.path)(batch).logits, load(checkpoint.path)(batch).logits)


def test_what_compressed_tensors_or_vllm_cannot_run_is_refused_at_once(tiny_llama, tmp_path):
    allocation = {
        **dict.fromkeys(["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
                         "model.layers.0.self_attn.v_proj"], "int4_g32_asym"),
        "model.layers.0.self_attn.o_proj": "nf4_g64",
        "model.layers.0.mlp.gate_proj": "int3_g32", "model.layers.0.mlp.up_proj": "int3_g32",
        "model.layers.0.mlp.down_proj": "fp8_e4m3_g32",
        "model.layers.1.self_attn.q_proj": "int4_g32", "model.layers.1.self_attn.k_proj": "int8_g32",
        "model.layers.1.self_attn.v_proj": "int8_g32",
        "model.layers.1.self_attn.o_proj": "int4_g16",
        "model.layers.1.mlp.down_proj": "int4_g64",  # K = 160
        "lm_head": "int8_pc",
        "kv.0.key": "int8_g64",
    }
    with pytest.raises(ArtifactError) as caught:
        write_checkpoint(tiny_llama, allocation, tmp_path / "out")
    message = str(caught.value)
    for expected in [
        "compressed-tensors cannot express this allocation:",
        "int4_g32_asym: compressed-tensors' asymmetric grids store an integer zero point",
        "nf4_g64: compressed-tensors has no NormalFloat codebook",
        "int4_g64: K is not a multiple of 64",
        "tie group split across int4_g32, int8_g32",
        "int8_g64 KV cache",
        "a compressed-tensors checkpoint for vLLM cannot express this allocation:",
        "int4_g32_asym: take int4_g32 instead, the symmetric grid of the same width and group",
        "int3_g32: vLLM's integer weight kernels (WNA16) take 4 or 8 bits: "
        "model.layers.0.mlp.gate_proj, model.layers.0.mlp.up_proj",
        "fp8_e4m3_g32: vLLM runs FP8 weights with one scale per channel",
        "int4_g16: vLLM's integer weight kernels (Marlin) take groups of 32, 64 or 128",
        "int8_pc: vLLM quantizes the Linear layers of the blocks only",
    ]:
        assert expected in message, expected
    assert message.endswith(checkpoint_module.TAKES)
    assert list(tmp_path.iterdir()) == []


def test_an_existing_folder_is_kept_unless_overwriting_is_allowed(tiny_llama, tmp_path):
    out = tmp_path / "existing"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="already exists"):
        write_checkpoint(tiny_llama, ALLOCATION, out)
    assert (out / "keep.txt").read_text() == "mine"
    assert write_checkpoint(tiny_llama, ALLOCATION, out, overwrite=True).path == out and not (out / "keep.txt").exists()


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_a_streamed_model_writes_the_whole_model_s_tensors_one_shard_per_block(tiny_llama, method, tmp_path):
    from bitalloc.quant.stream import open_streamed

    folder = tmp_path / "model"
    tiny_llama.module.save_pretrained(folder, max_shard_size="100KB")
    tiny_llama.tokenizer.save_pretrained(folder)
    streamed = open_streamed(folder, str(folder), torch.float32, torch.device("cpu"))
    calibration = calibration_tokens(tiny_llama.tokenizer, "zoo:evaluation", seq_len=32, count=4)
    options = {"method": method, "calibration": calibration if method == "gptq" else None}
    written = [write_checkpoint(m, ALLOCATION, tmp_path / name, **options)
               for name, m in (("whole", tiny_llama), ("streamed", streamed))]
    index = json.loads((written[1].path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert written[0].quantization_config == written[1].quantization_config

    def tensors(path):
        found = {}
        for file in sorted(path.glob("*.safetensors")):
            with safe_open(file, "pt") as f:
                found |= {name: f.get_tensor(name) for name in f.keys()}
        return found

    whole, streamed_tensors = tensors(written[0].path), tensors(written[1].path)
    assert whole.keys() == streamed_tensors.keys()
    for name, t in whole.items():
        if method == "rtn":
            assert torch.equal(streamed_tensors[name], t), name
        else:  # GPTQ's Hessians summed block by block round like the whole model's, to the last code
            torch.testing.assert_close(streamed_tensors[name].float(), t.float(), rtol=1e-3, atol=1e-3, msg=name)
    assert load(written[1].path)(tokens(tiny_llama)[:1]).logits.isfinite().all()

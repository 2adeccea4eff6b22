"""Artifacts: built from an allocation, loaded back verified, and equal to what simulation scored."""

import json
import math
import shutil
import struct

import pytest
import torch
from torch import nn

from bitalloc.kernels.quant_linear import Fp8Linear, QuantLinear
from bitalloc.quant.artifact import MANIFEST, WEIGHTS, Artifact, ArtifactError, build_artifact, load_artifact
from bitalloc.quant.calibration import calibration_tokens, evaluation_tokens
from bitalloc.quant.evaluate import Evaluator
from bitalloc.quant.formats import IntFormat, get_format
from bitalloc.quant.hessian import collect_hessians
from bitalloc.quant.quantizers import simulate
from bitalloc.quant.simulation import applied
from bitalloc.quant.units import enumerate_units, weight_matrix

# One format per storage path, in the tiny Llama's unit order (layer 0: q k v o gate up down,
# then layer 1); layer 0's down_proj (K = 160) has a partial last group. Layer 1's down_proj
# is left out of the allocation and must come back exactly as it was.
TINY_FORMATS = ("int2_g32", "int4_pc", "int5_g32", "int6_g64", "int8_g128", "fp8_e4m3", "int3_g64_asym",
                "nf4_g64", "fp6_e3m2", "fp4_e2m1", "bf16", "fp16", "fp8_e4m3_g32")


def expected_layer(format_name: str) -> type[nn.Module]:
    fmt = get_format(format_name)
    if isinstance(fmt, IntFormat):
        return QuantLinear
    return Fp8Linear if fmt.name == "fp8_e4m3" else nn.Linear


def safetensors_header_bytes(path) -> int:
    with open(path, "rb") as handle:
        return 8 + struct.unpack("<Q", handle.read(8))[0]


def predicted_bytes(model, allocation) -> int:
    """Format.nbytes over the allocated units plus every other distinct tensor in its dtype."""
    modules = dict(model.module.named_modules())
    units = sum(get_format(f).nbytes(tuple(weight_matrix(modules[n]).shape)) for n, f in allocation.items() if n in modules)
    weights = {f"{n}.weight" for n in allocation}
    rest = {id(t): t for n, t in model.module.state_dict(keep_vars=True).items() if n not in weights}
    return units + sum(t.numel() * t.element_size() for t in rest.values())


@pytest.fixture(scope="module")
def tiny_allocation(tiny_llama):
    units = enumerate_units(tiny_llama.module).weights
    allocation = {unit.name: name for unit, name in zip(units, TINY_FORMATS)}
    return {**allocation, "kv.0.key": "int8_g64"}


@pytest.fixture(scope="module")
def tiny_artifact(tiny_llama, tiny_allocation, tmp_path_factory):
    return build_artifact(tiny_llama, tiny_allocation, tmp_path_factory.mktemp("tiny") / "artifact")


@pytest.fixture(scope="module")
def tiny_loaded(tiny_artifact):
    return load_artifact(tiny_artifact.path)


def test_linear_units_run_on_kernel_layers_and_the_rest_is_restored(tiny_llama, tiny_allocation, tiny_loaded):
    modules = dict(tiny_loaded.module.named_modules())
    for name, format_name in tiny_allocation.items():
        if not name.startswith("kv."):
            assert type(modules[name]) is expected_layer(format_name), (name, format_name)
    original = tiny_llama.module.state_dict()
    left_out = "model.layers.1.mlp.down_proj.weight"
    assert left_out.removesuffix(".weight") not in tiny_allocation
    assert torch.equal(tiny_loaded.module.state_dict()[left_out], original[left_out])
    assert torch.equal(tiny_loaded.module.model.norm.weight, original["model.norm.weight"])
    assert tiny_loaded.module.lm_head.weight is tiny_loaded.module.model.embed_tokens.weight


def test_the_loaded_artifact_computes_what_simulation_scored(tiny_llama, tiny_allocation, tiny_loaded):
    weights_only = {name: f for name, f in tiny_allocation.items() if not name.startswith("kv.")}
    windows = evaluation_tokens(tiny_llama.tokenizer, "zoo:evaluation", seq_len=32, max_windows=2)
    simulated = Evaluator(tiny_llama, windows).evaluate(weights_only)
    measured = Evaluator(tiny_loaded, windows).evaluate({})
    assert measured.perplexity == pytest.approx(simulated.perplexity, rel=1e-6)
    assert simulated.kl > 0  # the allocation changes the model

    prompt = tiny_loaded.tokenizer("The whale", return_tensors="pt")["input_ids"]
    with torch.no_grad(), applied(tiny_llama, weights_only):
        simulated_text = tiny_llama.module.generate(prompt, max_new_tokens=5, do_sample=False)
    loaded_text = tiny_loaded.module.generate(prompt, max_new_tokens=5, do_sample=False)
    assert loaded_text.shape[1] == prompt.shape[1] + 5
    assert torch.equal(loaded_text, simulated_text)


def test_the_manifest_records_formats_hashes_and_provenance(tiny_artifact, tiny_allocation):
    manifest = Artifact.open(tiny_artifact.path).manifest
    assert manifest["allocation"] == tiny_allocation
    assert manifest["model"]["spec"] == "factory:tiny-llama" and manifest["method"] == "rtn"
    assert manifest["bitalloc_version"] and manifest["calibration"] is None
    down = manifest["units"]["model.layers.0.mlp.down_proj"]
    assert (down["format"], down["storage"], down["shape"], down["group_size"], down["method"]) == (
        "int3_g64_asym", "packed", [64, 160], 64, "rtn")
    assert manifest["units"]["model.layers.1.self_attn.q_proj"]["storage"] == "codes"
    assert not any(name.startswith("kv.") for name in manifest["tensors"])  # a runtime setting, not a tensor
    assert set(manifest["files"]) >= {WEIGHTS, "config.json", "tokenizer.json"}


def test_size_on_disk_is_the_predicted_bytes_plus_metadata(tiny_llama, tiny_allocation, tiny_artifact):
    weights = tiny_artifact.path / WEIGHTS
    predicted = predicted_bytes(tiny_llama, tiny_allocation)
    assert tiny_artifact.predicted_bytes == predicted
    header = safetensors_header_bytes(weights)
    assert weights.stat().st_size - header == predicted  # every K here is a multiple of 4: no fp8 padding
    manifest = (tiny_artifact.path / MANIFEST).stat().st_size
    assert abs(weights.stat().st_size + manifest - predicted) <= header + manifest
    assert tiny_artifact.disk_bytes == sum(p.stat().st_size for p in tiny_artifact.path.iterdir())


def test_gptq_artifact_equals_the_gptq_simulation(tiny_llama, tmp_path):
    units = enumerate_units(tiny_llama.module, example_inputs=tiny_llama.example_inputs)
    allocation = {u.name: ("nf4_g64" if i == 3 else ("int3_g32", "int4_g64_asym")[i % 2]) for i, u in enumerate(units.weights)}
    calibration = calibration_tokens(tiny_llama.tokenizer, "zoo:evaluation", seq_len=32, count=4)  # tokenized once
    artifact = build_artifact(tiny_llama, allocation, tmp_path / "gptq", method="gptq", calibration=calibration)
    hessians = collect_hessians(tiny_llama.module, units.weights, calibration.batches(4), tie_groups=units.tie_groups)
    tokens = calibration.inputs[:2]
    with torch.no_grad(), applied(tiny_llama, allocation, method="gptq", hessians=hessians):
        simulated = tiny_llama.module(tokens).logits
    with torch.no_grad(), applied(tiny_llama, allocation):
        rtn = tiny_llama.module(tokens).logits
    loaded = load_artifact(artifact.path).module(tokens).logits.detach()
    torch.testing.assert_close(loaded, simulated, rtol=0, atol=1e-5)
    assert (loaded - rtn).abs().max() > 1e-3  # GPTQ really ran: it is not the RTN model
    assert artifact.manifest["calibration"] == calibration.describe()
    methods = {u["format"]: u["method"] for u in artifact.manifest["units"].values()}
    assert methods == {"int3_g32": "gptq", "int4_g64_asym": "gptq", "nf4_g64": "rtn"}


def test_gptq_needs_calibration(tiny_llama, tmp_path):
    with pytest.raises(ArtifactError, match="GPTQ needs calibration"):
        build_artifact(tiny_llama, {"model.layers.0.mlp.up_proj": "int4_g64"}, tmp_path / "a", method="gptq")


def replace_bytes(file, old: bytes, new: bytes) -> None:
    file.write_bytes(file.read_bytes().replace(old, new, 1))


def flip_tensor_byte(path, tensor: str) -> None:
    weights = path / WEIGHTS
    header = safetensors_header_bytes(weights)
    begin, _ = json.loads(weights.read_bytes()[8:header])[tensor]["data_offsets"]
    data = bytearray(weights.read_bytes())
    data[header + begin] ^= 0x01
    weights.write_bytes(bytes(data))


CORRUPTIONS = {
    "a flipped bit in a tensor": (lambda p: flip_tensor_byte(p, "model.layers.0.self_attn.q_proj.scales"),
                                  r"tensor 'model\.layers\.0\.self_attn\.q_proj\.scales' does not match"),
    "a truncated weights file": (lambda p: (p / WEIGHTS).write_bytes((p / WEIGHTS).read_bytes()[:-100]),
                                 r"weights\.safetensors: \d+ bytes where the manifest says \d+; the file is truncated"),
    "an altered tokenizer": (lambda p: replace_bytes(p / "tokenizer.json", b"whale", b"whalf"), r"tokenizer\.json: sha256 differs"),
    "a retyped tensor in the header": (lambda p: replace_bytes(p / WEIGHTS, b'"I32"', b'"F32"'), r"tensor '.*' does not match the manifest \(dtype differ"),
    "a missing config": (lambda p: (p / "config.json").unlink(), r"config\.json: missing"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_artifact_is_refused_naming_what_is_wrong(tiny_artifact, tmp_path, corruption):
    damage, message = CORRUPTIONS[corruption]
    copy = shutil.copytree(tiny_artifact.path, tmp_path / "copy")
    damage(copy)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(copy)


@pytest.mark.parametrize("allocation, message", [
    ({"model.layers.0.mlp.no_such_proj": "int4_g128"}, r"names unit 'model\.layers\.0\.mlp\.no_such_proj', which"),
    ({"model.layers.0.mlp.up_proj": "int7_g128"}, r"unit 'model\.layers\.0\.mlp\.up_proj': format 'int7_g128'"),
    ({"model.layers.0.mlp.up_proj": "q9_k"}, r"unknown format 'q9_k'"),
    ({"model.layers.0.mlp.up_proj": "q4_k"}, r"q4_k is a llama.cpp \(ggml\) type.*--target gguf"),
    ({"lm_head": "int8_g128"}, r"one tied tensor"),
])
def test_a_bad_allocation_is_refused_before_anything_is_written(tiny_llama, tmp_path, allocation, message):
    with pytest.raises(ArtifactError, match=message):
        build_artifact(tiny_llama, allocation, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_an_existing_artifact_is_kept_unless_overwriting_is_allowed(tiny_llama, tiny_artifact, tmp_path):
    out = shutil.copytree(tiny_artifact.path, tmp_path / "existing")
    with pytest.raises(ArtifactError, match="already exists"):
        build_artifact(tiny_llama, {"model.layers.0.mlp.up_proj": "int8_g64"}, out)
    assert Artifact.open(out).manifest == tiny_artifact.manifest
    rebuilt = build_artifact(tiny_llama, {"model.layers.0.mlp.up_proj": "int8_g64"}, out, overwrite=True)
    assert Artifact.open(out).allocation == rebuilt.allocation == {"model.layers.0.mlp.up_proj": "int8_g64"}


def test_conv_units_are_dequantized_at_load(digits_cnn, tmp_path):
    allocation = {"features.0": "int4_g32", "features.2": "fp8_e4m3", "classifier.1": "int8_pc", "classifier.3": "nf4_g64"}
    loaded = load_artifact(build_artifact(digits_cnn, allocation, tmp_path / "cnn").path)
    modules = dict(loaded.module.named_modules())
    assert [type(modules[n]) for n in allocation] == [nn.Conv2d, nn.Conv2d, QuantLinear, nn.Linear]
    original = dict(digits_cnn.module.named_modules())["features.2"]
    expected = simulate(weight_matrix(original).detach().float(), get_format("fp8_e4m3"))
    assert torch.equal(weight_matrix(modules["features.2"]).detach(), expected)
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), applied(digits_cnn, allocation):
        simulated = digits_cnn.module(images)
    torch.testing.assert_close(loaded.module(images).detach(), simulated, rtol=0, atol=1e-5)


SMOLLM2_FORMATS = ("int3_g128", "int4_g64_asym", "int5_g128", "int6_g128", "int8_g128", "bf16")


def measured_perplexity(module: nn.Module, windows: torch.Tensor) -> float:
    """Next-token perplexity in one forward pass (the Evaluator would also run a reference copy)."""
    with torch.no_grad():
        logits = module(windows).logits.float()
    return math.exp(nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), windows[:, 1:].flatten()).item())


@pytest.mark.slow
def test_smollm2_artifact_matches_the_simulated_perplexity_size_and_generates(smollm2, tmp_path):
    units = enumerate_units(smollm2.module).weights
    allocation = {u.name: SMOLLM2_FORMATS[i % len(SMOLLM2_FORMATS)] for i, u in enumerate(units)}
    windows = evaluation_tokens(smollm2.tokenizer, "zoo:evaluation", seq_len=128, max_windows=2)
    simulated = Evaluator(smollm2, windows).evaluate(allocation)

    artifact = build_artifact(smollm2, allocation, tmp_path / "smollm2")
    loaded = load_artifact(artifact.path)
    assert measured_perplexity(loaded.module, windows.inputs) == pytest.approx(simulated.perplexity, rel=1e-3)
    assert simulated.perplexity > simulated.reference_perplexity  # the quantization is real

    weights = artifact.path / WEIGHTS
    manifest = (artifact.path / MANIFEST).stat().st_size
    metadata = safetensors_header_bytes(weights) + manifest
    assert artifact.predicted_bytes == predicted_bytes(smollm2, allocation)
    assert abs(weights.stat().st_size + manifest - artifact.predicted_bytes) <= metadata

    prompt = loaded.tokenizer("The whale swam", return_tensors="pt")["input_ids"]
    generated = loaded.module.generate(prompt, max_new_tokens=3, do_sample=False)
    assert generated.shape[1] == prompt.shape[1] + 3
    assert loaded.tokenizer.decode(generated[0, prompt.shape[1]:]).strip()

"""llama.cpp's own types as candidate formats: bytes and simulation equal what llama-quantize writes.

The tests that need the built tools (``bitalloc llamacpp build``; .ci/run builds them once per
machine) skip, saying so, where they are not built. The reference is llama-quantize itself: a
tiny random Llama is converted by the vendored ``convert_hf_to_gguf.py`` and quantized by the
real tool, and its tensors are read back with ``gguf.GGUFReader``.
"""

from __future__ import annotations

import os
import subprocess

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from bitalloc import ggml
from bitalloc.quant.formats import GgmlFormat, get_format, parse_formats
from bitalloc.quant.llamacpp import tools as llamacpp_tools
from bitalloc.quant.quantizers import simulate, uses_gptq

TYPES = [t.lower() for t in ggml.FORMATS]
SHORT_ROW_TYPES = ("q4_k", "iq4_xs", "q6_k")  # -> Q5_0, IQ4_NL, Q8_0 on rows of 288
PERMUTED = ("attn_q", "attn_k")  # the converter reorders these rows for llama.cpp's rotary layout


@pytest.fixture(scope="module")
def built():
    found = llamacpp_tools.find()
    if found is None:
        pytest.skip(f"llama.cpp's tools are not built in {llamacpp_tools.install_dir()}: run `bitalloc llamacpp build`")
    return found


@pytest.fixture(scope="module")
def tiny_gguf(built, zoo, tmp_path_factory):
    """A random Llama as the converter writes it: rows of 256, and of 288 for ffn_down (256-blocks fall back there)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bitalloc.quant.units import enumerate_units
    from bitalloc.quant.zoo import zoo_model_dir

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(zoo_model_dir("llm"))  # a tokenizer the converter knows
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=288, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(folder / "hf")
    tokenizer.save_pretrained(folder / "hf")
    f16 = folder / "f16.gguf"
    done = subprocess.run(built.convert_command(folder / "hf", f16), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    units = enumerate_units(model)
    weights = {u.name: model.get_submodule(u.name).weight.detach() for u in units.weights}
    return f16, units, weights


@pytest.fixture(scope="module")
def quantized(built, tiny_gguf, tmp_path_factory):
    """Every type on some tensor of 256-long rows, and three 256-block types on ffn_down's 288-long rows, written by
    the real llama-quantize running the llama.cpp export's script; the file's tensors read back once."""
    from bitalloc.quant.export import export_allocation

    source, units, weights = tiny_gguf
    full = [unit for unit, w in weights.items() if w.shape[1] == 256]
    allocation = {unit: TYPES[i % len(TYPES)] for i, unit in enumerate(full)}
    short = [unit for unit in weights if unit not in allocation]
    allocation.update(zip(short, SHORT_ROW_TYPES, strict=True))
    assert set(allocation.values()) == set(TYPES)
    folder = tmp_path_factory.mktemp("quantized")
    script = folder / "quantize.sh"
    script.write_bytes(export_allocation("llama.cpp", allocation, units.units, units.tie_groups, {}).data)
    done = subprocess.run(["sh", str(script), str(source), str(folder / "mixed.gguf"), "2"], capture_output=True,
                          text=True, env={**os.environ, "LLAMA_QUANTIZE": str(built.quantize)})
    assert done.returncode == 0, done.stderr[-2000:]
    tensors = {t.name: t for t in GGUFReader(folder / "mixed.gguf").tensors}
    return allocation, weights, tensors


def gguf_name(unit: str) -> str:
    from bitalloc.quant.gguf_names import gguf_tensor

    return gguf_tensor(unit).name + ".weight"


def assert_written_as_simulated(unit: str, w: torch.Tensor, fmt: GgmlFormat, tensor) -> None:
    shape = tuple(w.shape)
    assert tensor.tensor_type.name == fmt.ggml_type_for(shape), unit
    block, size = GGML_QUANT_SIZES[tensor.tensor_type]
    assert fmt.nbytes(shape) == tensor.n_bytes == shape[0] * shape[1] // block * size, unit
    ours, theirs = fmt.encode(w), np.asarray(tensor.data).reshape(shape[0], -1)
    permuted = any(kind in tensor.name for kind in PERMUTED)
    if permuted:  # each row is quantized on its own: the converter's reordering only permutes them
        ours, theirs = np.unique(ours, axis=0), np.unique(theirs, axis=0)
    assert np.array_equal(ours, theirs), f"{unit}: {fmt.name} blocks differ from llama-quantize's"
    if not permuted:
        decoded = dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(shape)
        assert torch.equal(fmt.fake_quantize(w), torch.from_numpy(decoded)), unit


@pytest.mark.slow
@pytest.mark.parametrize("name", TYPES)
def test_each_type_is_what_llama_quantize_writes_byte_for_byte(quantized, name):
    allocation, weights, tensors = quantized
    units = [unit for unit, fmt in allocation.items() if fmt == name and weights[unit].shape[1] == 256]
    assert units
    for unit in units:
        assert_written_as_simulated(unit, weights[unit], get_format(name), tensors[gguf_name(unit)])


@pytest.mark.slow
@pytest.mark.parametrize("name", SHORT_ROW_TYPES)
def test_rows_a_256_block_does_not_divide_are_written_in_the_fallback_as_simulated(quantized, name):
    allocation, weights, tensors = quantized
    (unit,) = [unit for unit, fmt in allocation.items() if fmt == name and weights[unit].shape[1] == 288]
    tensor = tensors[gguf_name(unit)]
    assert tensor.tensor_type.name == ggml.FALLBACK[name.upper()]
    assert_written_as_simulated(unit, weights[unit], get_format(name), tensor)


def test_an_importance_matrix_changes_the_rounding_as_llama_cpp_weighs_it(built):
    from bitalloc.quant.quantizers import importance_matrix

    torch.manual_seed(1)
    w = torch.randn(16, 256)
    x = torch.randn(100, 256) * torch.rand(256) ** 2  # calibration inputs with uneven columns
    importance = importance_matrix(x.T @ x, tokens=100)
    assert torch.allclose(importance, (x ** 2).mean(dim=0))  # llama-imatrix's mean squared activation
    fmt = get_format("q4_k")
    plain, weighted = fmt.fake_quantize(w), fmt.fake_quantize(w, importance)
    assert not torch.equal(plain, weighted)
    # ggml's weighted fit lowers the importance-weighted error it minimises
    weighted_error = lambda q: float(((q - w) ** 2 * importance).sum())  # noqa: E731
    assert weighted_error(weighted) < weighted_error(plain)
    assert torch.equal(simulate(w, fmt, importance=importance), weighted)


def test_method_gptq_simulates_ggml_types_with_the_calibration_importance_matrix(built):
    """A profile cell and an applied allocation both weigh ggml's rounding by the mean squared input
    of the layer over the calibration samples (what llama-imatrix would store); rtn weighs nothing."""
    from torch import nn

    from bitalloc.quant.calibration import CalibrationSet
    from bitalloc.quant.loading import LoadedModel
    from bitalloc.quant.metrics.context import ProfilingContext
    from bitalloc.quant.simulation import applied
    from bitalloc.quant.units import enumerate_units

    torch.manual_seed(2)
    module = nn.Sequential(nn.Linear(256, 32, bias=False))
    inputs = torch.randn(40, 256) * torch.rand(256) ** 2
    model = LoadedModel("test:linear", module, example_inputs=(inputs[:1],))
    calibration = CalibrationSet(inputs, "test:random", "0" * 64, tokens=False)
    units = enumerate_units(module)
    (unit,) = units.weights
    fmt, w = get_format("q4_0"), module[0].weight.detach().clone()

    ctx = ProfilingContext(model, units, [fmt], calibration, method="gptq")
    importance = ctx.hessians.importance(unit.name)
    assert torch.allclose(importance, (inputs ** 2).mean(dim=0), rtol=1e-5)
    weighted = ctx.quantized(unit, fmt)
    assert torch.equal(weighted, fmt.fake_quantize(w, importance))
    assert not torch.equal(weighted, fmt.fake_quantize(w))
    with applied(model, {unit.name: "q4_0"}, method="gptq", hessians=ctx.hessians):
        assert torch.equal(module[0].weight, weighted)
    assert torch.equal(ProfilingContext(model, units, [fmt], calibration).quantized(unit, fmt), fmt.fake_quantize(w))


@pytest.mark.slow
def test_a_small_job_profiles_solves_and_evaluates_over_ggml_types(built, zoo, tmp_path):
    from bitalloc.pipeline import JobSpec, run_job
    from bitalloc.pipeline.baselines import baseline_points
    from bitalloc.search import Budgets

    spec = JobSpec(model="factory:tiny-llama", formats=["q4_k", "q6_k", "q8_0"], budgets=Budgets(max_avg_bits=7.0),
                   points=6, seq_len=32, samples=4, eval_windows=2)
    result = run_job(spec, profile_dir=tmp_path)
    profile = result.profile
    for u, unit in enumerate(profile.units):
        for f, name in enumerate(profile.formats):
            stored = ggml.stored_type(name.upper(), unit.shape[1])  # tiny-llama's rows (64, 160) all fall back
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType[stored]]
            assert profile.bytes[u, f] == unit.shape[0] * unit.shape[1] // block * size
    assert result.chosen.avg_bits <= 7.0 and result.evaluation["kl"] > 0
    assert set(result.chosen.formats.values()) <= {"q4_k", "q6_k", "q8_0"}
    mixes = [p for p in baseline_points(profile) if p["kind"] == "llama.cpp"]
    assert mixes, "llama.cpp's mixes are drawn on a profile of ggml types"


def test_names_bits_and_bytes_follow_ggml_without_the_tools():
    for name in TYPES:
        fmt = get_format(name)
        assert isinstance(fmt, GgmlFormat) and fmt.name == name and get_format(name.upper()) == fmt
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[name.upper()]]
        assert fmt.nbytes((3, 4 * block)) == 3 * 4 * size
        assert not uses_gptq(fmt, "gptq")  # GPTQ is for bitalloc's integer grids; ggml rounds these itself
        with pytest.raises(TypeError, match="llama-quantize"):
            fmt.quantize(torch.zeros(2, block))
    assert [f.name for f in parse_formats("q4_k,int4_g128,iq4_xs")] == ["q4_k", "int4_g128", "iq4_xs"]
    with pytest.raises(ValueError, match="q4_k, q5_k, q6_k, q8_0, q4_0"):
        get_format("q7_k")


@pytest.mark.parametrize("name, row, stored", [
    ("q4_k", 576, "Q5_0"), ("q2_k", 576, "Q4_0"), ("q6_k", 1536, "Q6_K"), ("iq4_xs", 96, "IQ4_NL"),
    ("iq3_s", 96, "IQ4_NL"), ("q4_k", 40, "F16"), ("q8_0", 48, "F16"), ("q4_1", 96, "Q4_1"),
])
def test_rows_the_block_does_not_divide_take_llama_cpps_fallback(name, row, stored):
    """``tensor_type_fallback`` in the vendored src/llama-quant.cpp, case by case."""
    fmt = get_format(name)
    assert fmt.ggml_type_for((8, row)) == stored
    block, size = GGML_QUANT_SIZES[GGMLQuantizationType[stored]]
    assert fmt.nbytes((8, row)) == 8 * row // block * size


def test_a_row_kept_f16_is_simulated_as_float16_without_the_tools(monkeypatch, tmp_path):
    monkeypatch.setenv("BITALLOC_LLAMACPP_DIR", str(tmp_path))
    w = torch.randn(4, 40)
    assert torch.equal(get_format("q4_k").fake_quantize(w), w.half().float())


def test_without_the_tools_a_job_is_refused_with_the_command_to_build_them(monkeypatch, tmp_path):
    from bitalloc.pipeline import JobSpec
    from bitalloc.pipeline.inputs import InputError, check_inputs
    from bitalloc.quant.loading import LoadPolicy

    monkeypatch.setenv("BITALLOC_LLAMACPP_DIR", str(tmp_path))
    spec = JobSpec(model="factory:tiny-llama", formats=["int4_g128", "q4_k"])
    with pytest.raises(InputError, match=r"q4_k: llama.cpp's tools are not built .*run `bitalloc llamacpp build`") as info:
        check_inputs(spec, LoadPolicy())
    assert info.value.field == "formats"
    check_inputs(JobSpec(model="factory:tiny-llama", formats=["int4_g128"]), LoadPolicy())


def test_llama_cpp_mixes_take_the_jobs_ggml_types_themselves():
    """On SmolLM2's shapes Q4_K_M writes Q4_K, Q6_K and, on 576-long rows, Q5_0 and Q8_0: with q4_k and q6_k among
    the formats every tensor gets a format that llama-quantize writes as exactly its type, bytes included."""
    from bitalloc.search import Problem
    from bitalloc.search.baselines import ModelInfo, UnitInfo, llamacpp

    shapes = {"attn_q": (576, 576), "attn_k": (192, 576), "attn_v": (192, 576), "attn_output": (576, 576),
              "ffn_gate": (1536, 576), "ffn_up": (1536, 576), "ffn_down": (576, 1536)}
    units = [(f"model.layers.{b}.{kind}", b, kind, shape) for b in range(30) for kind, shape in shapes.items()]
    names = ["int4_g128", "q4_k", "q6_k", "int8_g128"]
    formats = [get_format(n) for n in names]
    problem = Problem(error=np.ones((len(units), len(names))), numel=[n * k for *_, (n, k) in units],
                      bytes=[[f.nbytes(shape) for f in formats] for *_, shape in units],
                      unit_names=[u[0] for u in units], format_names=names)
    infos = {name: UnitInfo(block=b, kind=kind, row=shape[1]) for name, b, kind, shape in units}
    allocation = llamacpp(problem, infos, "Q4_K_M", ModelInfo(n_blocks=30, n_gqa=3, has_output=False))
    types = allocation.info["ggml_types"]
    assert set(types.values()) == {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}
    for name, b, kind, shape in units:
        assert ggml.stored_type(allocation.formats[name].upper(), shape[1]) == types[name]
    expected = 0
    for name, *_, (n, k) in units:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType[types[name]]]
        expected += n * k // block * size
    assert allocation.bytes == expected and allocation.info["real_types"] == len(units)

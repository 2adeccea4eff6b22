"""Each sensitivity metric against an independent computation of what it claims to measure."""

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from bitalloc.quant.calibration import CalibrationSet, calibration_tokens
from bitalloc.quant.evaluate import Evaluator
from bitalloc.quant.formats import get_format
from bitalloc.quant.loading import LoadedModel
from bitalloc.quant.metrics import METRICS
from bitalloc.quant.metrics.context import ProfilingContext
from bitalloc.quant.metrics.kl import kl_windows
from bitalloc.quant.units import UnitSet, enumerate_units, weight_units

FORMATS = [get_format(n) for n in ("bf16", "int2_g32", "int8_g32", "nf4_g64")]


@pytest.fixture(scope="module")
def tiny_ctx(tiny_llama):
    units = enumerate_units(tiny_llama.module, example_inputs=tiny_llama.example_inputs)
    calibration = calibration_tokens(tiny_llama.tokenizer, "zoo:calibration", seq_len=32, count=4, seed=0)
    return ProfilingContext(tiny_llama, units, FORMATS, calibration, batch_size=2)


def test_every_metric_is_registered():
    assert {"output_mse", "hessian_trace", "fisher", "kl"} <= set(METRICS)


def test_output_mse_is_the_measured_layer_output_error(tiny_ctx):
    modules = tiny_ctx.modules
    inputs: dict[str, list[torch.Tensor]] = {u.name: [] for u in tiny_ctx.weight_units}
    handles = [modules[name].register_forward_pre_hook(lambda _m, args, name=name: inputs[name].append(args[0]))
               for name in inputs]
    with torch.no_grad():
        for batch in tiny_ctx.batches():
            tiny_ctx.module(batch, use_cache=False)
    for handle in handles:
        handle.remove()

    errors = METRICS["output_mse"](tiny_ctx)
    for i, unit in enumerate(tiny_ctx.weight_units):
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs[unit.name]]).double()
        assert len(x) == tiny_ctx.calibration.samples
        for j, fmt in enumerate(FORMATS):
            dw = (fmt.fake_quantize(tiny_ctx.weight(unit)) - tiny_ctx.weight(unit)).double()
            measured = float(((x @ dw.T) ** 2).sum()) / len(x)
            assert errors[i, j] == pytest.approx(measured, rel=1e-4), (unit.name, fmt.name)
    assert (errors[:, 1] > errors[:, 2]).all()  # int2 hurts every layer more than int8


def test_fisher_is_the_mean_squared_window_gradient(tiny_ctx):
    model = tiny_ctx.module
    modules = tiny_ctx.modules
    weights = [modules[u.name].weight for u in tiny_ctx.weight_units]
    squares = [torch.zeros_like(w) for w in weights]
    for window in tiny_ctx.calibration.inputs:
        loss = model(window[None], labels=window[None], use_cache=False).loss  # transformers' own shifted loss
        for s, g in zip(squares, torch.autograd.grad(loss, weights)):
            s += g ** 2
    errors = METRICS["fisher"](tiny_ctx)
    windows = len(tiny_ctx.calibration.inputs)
    for i, unit in enumerate(tiny_ctx.weight_units):
        w = tiny_ctx.weight(unit)
        for j, fmt in enumerate(FORMATS):
            expected = float((squares[i] / windows * (fmt.fake_quantize(w) - w) ** 2).sum(dtype=torch.float64))
            assert errors[i, j] == pytest.approx(expected, rel=1e-4), (unit.name, fmt.name)
    assert (errors[:, 1] > errors[:, 2]).all()


def micro_llama() -> LoadedModel:
    """A one-layer Llama small enough for its exact Hessian, with weights far from a minimum."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=48, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=64)
    generator = torch.Generator().manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.3)
    return LoadedModel("micro-llama", model)


def exact_hessian(model: torch.nn.Module, name: str, tokens: torch.Tensor) -> torch.Tensor:
    """The full Hessian of the mean next-token loss in one weight, by torch.autograd.functional."""
    params = dict(model.named_parameters())
    shape = params[f"{name}.weight"].shape

    def loss_of(flat: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, {**params, f"{name}.weight": flat.reshape(shape)}, (tokens,),
                                 {"use_cache": False}).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())

    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.hessian(loss_of, params[f"{name}.weight"].detach().flatten().clone())


def test_hutchinson_trace_matches_the_exact_hessian_trace():
    loaded = micro_llama()
    name = "model.layers.0.mlp.up_proj"
    tokens = torch.randint(0, 48, (4, 12), generator=torch.Generator().manual_seed(1))
    calibration = CalibrationSet(tokens, "random", "-")
    fmt = get_format("int4_g32")
    samples = 1000
    ctx = ProfilingContext(loaded, UnitSet(weight_units(loaded.module, include=[name])), [fmt], calibration,
                           batch_size=4, options={"hutchinson_samples": samples})
    error = METRICS["hessian_trace"](ctx)[0, 0]

    hessian = exact_hessian(loaded.module, name, tokens)
    exact = float(hessian.trace())
    # Rademacher Hutchinson variance per sample: 2 * (sum of squared off-diagonal entries).
    standard_error = math.sqrt(2 * float((hessian ** 2).sum() - (hessian.diag() ** 2).sum()) / samples)
    assert standard_error < 0.03 * abs(exact)  # the check below is tight enough to mean something
    w = ctx.weight(ctx.weight_units[0])
    perturbation = float(((fmt.fake_quantize(w) - w) ** 2).sum())
    estimated = error * w.numel() / perturbation  # error = Tr(H) / numel * ||dW||^2
    assert estimated == pytest.approx(exact, abs=4 * standard_error)


def test_hessian_trace_on_the_first_windows_is_the_trace_of_those_windows_alone(tiny_ctx):
    options = {"hutchinson_samples": 2}
    first = ProfilingContext(tiny_ctx.model, tiny_ctx.units, tiny_ctx.formats, tiny_ctx.calibration.head(2, 16),
                             batch_size=2, options=options)
    subset = ProfilingContext(tiny_ctx.model, tiny_ctx.units, tiny_ctx.formats, tiny_ctx.calibration, batch_size=2,
                              options={**options, "hutchinson_windows": 2, "hutchinson_tokens": 16})
    whole = ProfilingContext(tiny_ctx.model, tiny_ctx.units, tiny_ctx.formats, tiny_ctx.calibration, batch_size=2,
                             options=options)
    on_subset = METRICS["hessian_trace"](subset)
    np.testing.assert_allclose(on_subset, METRICS["hessian_trace"](first), rtol=1e-6)
    assert not np.allclose(on_subset, METRICS["hessian_trace"](whole), rtol=1e-3)  # the option does cut the text


def test_hessian_trace_grows_with_the_perturbation(tiny_ctx):
    errors = METRICS["hessian_trace"](ProfilingContext(
        tiny_ctx.model, tiny_ctx.units, tiny_ctx.formats, tiny_ctx.calibration, batch_size=4,
        options={"hutchinson_samples": 2}))
    assert errors.shape == (len(tiny_ctx.weight_units), len(FORMATS)) and np.isfinite(errors).all()
    # Within a unit the trace is one number: cells scale exactly with ||Q(W) - W||^2.
    for i, unit in enumerate(tiny_ctx.weight_units):
        w = tiny_ctx.weight(unit)
        norms = [float(((f.fake_quantize(w) - w) ** 2).sum()) for f in FORMATS]
        assert errors[i, 1] / norms[1] == pytest.approx(errors[i, 2] / norms[2], rel=1e-5)


def test_kl_cell_is_the_evaluator_on_a_one_unit_allocation(tiny_ctx):
    chosen = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"]
    ctx = ProfilingContext(tiny_ctx.model, tiny_ctx.units, FORMATS, tiny_ctx.calibration, batch_size=2,
                           options={"units": chosen, "formats": ["bf16", "int2_g32", "int8_g32"], "kl_tokens": 64})
    errors = METRICS["kl"](ctx)
    rows = [i for i, u in enumerate(ctx.weight_units) if u.name in chosen]
    assert np.isnan(np.delete(errors, rows, axis=0)).all() and np.isnan(errors[:, 3]).all()
    windows = tiny_ctx.calibration.inputs[:2]
    evaluator = Evaluator(tiny_ctx.model, CalibrationSet(windows, "calibration", "-"), batch_size=2)
    for i in rows:
        name = ctx.weight_units[i].name
        bf16, int2, int8 = errors[i, :3]
        assert int2 == pytest.approx(evaluator.evaluate({name: "int2_g32"}).kl, rel=1e-6)
        assert int2 > int8 > 0 and bf16 < 1e-3 * int2


def test_kl_token_budget_and_bad_options(tiny_ctx):
    calibration = tiny_ctx.calibration
    assert kl_windows(calibration, 70).inputs.shape == (2, 32)
    assert kl_windows(calibration, 20).inputs.shape == (1, 20)
    assert kl_windows(calibration, None) is calibration
    with pytest.raises(ValueError, match="formats"):
        METRICS["kl"](ProfilingContext(tiny_ctx.model, tiny_ctx.units, FORMATS, calibration,
                                       options={"formats": ["int3_g64"]}))
    with pytest.raises(ValueError, match="units"):
        METRICS["kl"](ProfilingContext(tiny_ctx.model, tiny_ctx.units, FORMATS, calibration,
                                       options={"units": ["*nothing*"]}))


def test_gradient_metrics_refuse_a_model_without_tokens(digits_cnn):
    from bitalloc.quant.calibration import tensor_samples

    units = enumerate_units(digits_cnn.module)
    ctx = ProfilingContext(digits_cnn, units, FORMATS, tensor_samples("zoo:digits", count=8))
    with pytest.raises(ValueError, match="language model"):
        METRICS["fisher"](ctx)
    assert np.isfinite(METRICS["output_mse"](ctx)).all()

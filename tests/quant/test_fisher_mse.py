"""``fisher_mse`` against independent computations: its output Fisher by another autograd
route, and its cells against the KL measured when one unit alone is quantized."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from bitalloc.quant.calibration import calibration_tokens, tensor_samples
from bitalloc.quant.evaluate import Evaluator
from bitalloc.quant.formats import get_format
from bitalloc.quant.metrics import METRICS
from bitalloc.quant.metrics.context import ProfilingContext
from bitalloc.quant.metrics.fisher_mse import output_fisher
from bitalloc.quant.units import UnitSet, enumerate_units

FORMATS = [get_format(n) for n in ("int2_g32", "int4_g32", "int8_g32")]


@pytest.fixture(scope="module")
def tiny_ctx(tiny_llama):
    units = enumerate_units(tiny_llama.module, example_inputs=tiny_llama.example_inputs)
    calibration = calibration_tokens(tiny_llama.tokenizer, "zoo:calibration", seq_len=32, count=4, seed=0)
    return ProfilingContext(tiny_llama, units, FORMATS, calibration, options={"fisher_batch_size": 2})


def test_output_fisher_is_the_mean_squared_sampled_score_of_each_output(tiny_ctx):
    """Recompute G with every parameter differentiable and ``retain_grad`` on the outputs:
    no leaf trick, so a cut gradient path in the metric would show as a mismatch."""
    units = tiny_ctx.weight_units
    fast = output_fisher(tiny_ctx, units, torch.Generator().manual_seed(7))

    modules = [tiny_ctx.modules[u.name] for u in units]
    outputs: dict[int, torch.Tensor] = {}
    def keep(index: int):
        def hook(_module, _args, out: torch.Tensor) -> None:
            out.retain_grad()
            outputs[index] = out
        return hook

    handles = [m.register_forward_hook(keep(i)) for i, m in enumerate(modules)]
    generator = torch.Generator().manual_seed(7)
    sums = [torch.zeros(u.shape[0], dtype=torch.float64) for u in units]
    rows = 0
    try:
        with torch.enable_grad():
            for batch in tiny_ctx.calibration.batches(2):
                logits = tiny_ctx.module(batch, use_cache=False).logits[:, :-1].float().flatten(0, 1)
                log_probs = torch.log_softmax(logits, -1)
                labels = torch.multinomial(log_probs.detach().exp(), 1, generator=generator)
                tiny_ctx.module.zero_grad()
                log_probs.gather(-1, labels).sum().backward()
                for i in outputs:
                    sums[i] += (outputs[i].grad.double() ** 2).sum((0, 1))
                rows += len(logits) + len(batch)  # every position has an output row, the last one included
    finally:
        for handle in handles:
            handle.remove()
        tiny_ctx.module.zero_grad(set_to_none=True)
    for g, s in zip(fast, sums):
        torch.testing.assert_close(g.double(), s / rows, rtol=1e-4, atol=1e-12)


def test_fisher_mse_orders_formats_and_works_for_a_classifier(tiny_ctx, digits_cnn):
    errors = METRICS["fisher_mse"](tiny_ctx)
    assert (errors > 0).all() and (errors[:, 0] > errors[:, 1]).all() and (errors[:, 1] > errors[:, 2]).all()
    units = enumerate_units(digits_cnn.module)
    ctx = ProfilingContext(digits_cnn, units, FORMATS, tensor_samples("zoo:digits", count=32))
    cnn = METRICS["fisher_mse"](ctx)
    assert np.isfinite(cnn).all() and (cnn[:, 0] > cnn[:, 2]).all()


@pytest.mark.reference
@pytest.mark.slow
def test_fisher_mse_predicts_the_kl_of_one_quantized_unit_on_the_reference_lm(smollm2):
    """Each cell is meant as the KL (nats per token) that quantizing that unit alone causes:
    compare with that KL measured on the same windows, over units of every kind."""
    every = enumerate_units(smollm2.module, example_inputs=smollm2.example_inputs)
    chosen = [u for u in every.weights if u.block in (2, 14, 27)]
    units = UnitSet(chosen, [])
    fmt = get_format("int4_g128")
    windows = calibration_tokens(smollm2.tokenizer, "zoo:calibration", seq_len=128, count=4, seed=3)
    predicted = METRICS["fisher_mse"](ProfilingContext(smollm2, units, [fmt], windows))[:, 0]
    evaluator = Evaluator(smollm2, windows)
    measured = np.array([evaluator.evaluate({u.name: fmt.name}).kl for u in chosen])
    ratio = predicted / measured
    assert 0.5 < np.median(ratio) < 2.0, ratio
    assert spearmanr(predicted, measured).statistic > 0.6

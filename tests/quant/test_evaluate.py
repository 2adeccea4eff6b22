from dataclasses import replace

import numpy as np
import pytest
import torch

from bitalloc.quant.calibration import evaluation_tokens
from bitalloc.quant.evaluate import Evaluator, allocation_size, uniform
from bitalloc.quant.formats import get_format
from bitalloc.quant.simulation import applied
from bitalloc.quant.units import enumerate_units


@pytest.fixture(scope="module")
def evaluator(tiny_llama):
    windows = evaluation_tokens(tiny_llama.tokenizer, "zoo:evaluation", seq_len=32, max_windows=4)
    return Evaluator(tiny_llama, windows, batch_size=2)


def test_the_unquantized_allocation_has_zero_kl_and_the_base_perplexity(evaluator):
    result = evaluator.evaluate({})
    assert result.kl == 0.0 and result.top1 == 1.0
    assert result.perplexity == pytest.approx(result.reference_perplexity, rel=1e-12)
    assert result.tokens == 4 * 31


def test_fewer_bits_diverge_more(tiny_llama, evaluator):
    units = enumerate_units(tiny_llama.module).weights
    low = evaluator.evaluate(uniform(units, "int2_g32"))
    high = evaluator.evaluate(uniform(units, "int8_g32"))
    assert low.kl > high.kl > 0
    assert low.top1 <= high.top1


def test_weights_are_restored_even_after_an_error(tiny_llama):
    before = {k: v.clone() for k, v in tiny_llama.module.state_dict().items()}
    units = enumerate_units(tiny_llama.module).weights
    with pytest.raises(KeyError, match="no_such_unit"):
        with applied(tiny_llama, {**uniform(units, "int2_g32"), "no_such_unit": "int4_g32"}):
            pass
    after = tiny_llama.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_allocation_size_counts_exact_bytes(tiny_llama):
    units = enumerate_units(tiny_llama.module).weights
    allocation = {u.name: ("int4_g32" if i % 2 else "int8_g32") for i, u in enumerate(units)}
    nbytes, avg_bits = allocation_size(units, allocation)
    assert nbytes == sum(get_format(allocation[u.name]).nbytes(u.shape) for u in units)
    assert avg_bits == pytest.approx(8 * nbytes / sum(u.numel for u in units))


def test_evaluation_needs_a_language_model(digits_cnn, tiny_llama):
    windows = evaluation_tokens(tiny_llama.tokenizer, "zoo:evaluation", seq_len=32, max_windows=1)
    with pytest.raises(ValueError, match="not a causal language model"):
        Evaluator(digits_cnn, windows)


def test_kv_units_in_an_allocation_are_simulated(tiny_llama, evaluator):
    keys_2bit = evaluator.evaluate({"kv.0.key": "int2_g32", "kv.1.key": "int2_g32"})
    keys_8bit = evaluator.evaluate({"kv.0.key": "int8_g32", "kv.1.key": "int8_g32"})
    assert keys_2bit.kl > keys_8bit.kl >= 0 and keys_2bit.kl > 0
    assert evaluator.evaluate({"kv.0.value": "bf16"}).kl == 0.0


def test_fewer_windows_then_all_score_as_a_fresh_evaluator(tiny_llama):
    """The reference cache is by batch index and size: a short last batch must not be reused."""
    windows = evaluation_tokens(tiny_llama.tokenizer, "zoo:evaluation", seq_len=32, max_windows=4)
    units = enumerate_units(tiny_llama.module).weights
    allocation = uniform(units, "int4_g32")
    warmed = Evaluator(tiny_llama, windows, batch_size=2)
    assert warmed.evaluate(allocation, max_windows=1).tokens == 31
    assert warmed.evaluate(allocation).kl == pytest.approx(Evaluator(tiny_llama, windows, batch_size=2)
                                                           .evaluate(allocation).kl, rel=1e-9)


def test_the_weight_cache_quantizes_each_cell_once(tiny_llama, monkeypatch):
    import bitalloc.quant.simulation

    calls = []
    real = bitalloc.quant.simulation.simulate
    monkeypatch.setattr(bitalloc.quant.simulation, "simulate", lambda *a, **k: calls.append(a[1].name) or real(*a, **k))
    windows = evaluation_tokens(tiny_llama.tokenizer, "zoo:evaluation", seq_len=32, max_windows=2)
    units = enumerate_units(tiny_llama.module).weights
    cached = Evaluator(tiny_llama, windows, weight_cache_bytes=1e9)
    first = cached.evaluate(uniform(units, "int4_g32"))
    assert len(calls) == len(units)
    again = cached.evaluate(uniform(units, "int4_g32"))
    assert len(calls) == len(units) and again.kl == first.kl
    mixed = {**uniform(units, "int4_g32"), units[0].name: "int8_g32"}
    cached.evaluate(mixed)
    assert calls[len(units):] == ["int8_g32"]  # only the new cell is quantized


def test_measured_kl_scores_the_windows_its_sample_count_covers(tiny_llama):
    from bitalloc.quant.evaluate import MeasuredKL

    windows = evaluation_tokens(tiny_llama.tokenizer, "zoo:evaluation", seq_len=32, max_windows=4)
    units = enumerate_units(tiny_llama.module).weights
    evaluator = Evaluator(tiny_llama, windows, batch_size=2)
    allocation = type("A", (), {"formats": uniform(units, "int2_g32")})()
    measured = MeasuredKL(evaluator)
    two, every = measured(allocation, 33), measured(allocation, 10_000)
    assert two.shape == (2,) and two.mean() == pytest.approx(evaluator.evaluate(allocation.formats, max_windows=2).kl,
                                                             rel=1e-12)
    assert every.shape == (4,) and every.mean() == pytest.approx(evaluator.evaluate(allocation.formats).kl, rel=1e-12)


def test_window_kl_is_each_window_scored_alone(tiny_llama):
    """The per-window KLs (what a paired test over windows reads) average to the KL, and each is
    what an evaluator holding that one window measures."""
    from bitalloc.quant.evaluate import MeasuredKL

    windows = evaluation_tokens(tiny_llama.tokenizer, "zoo:evaluation", seq_len=32, max_windows=3)
    allocation = uniform(enumerate_units(tiny_llama.module).weights, "int2_g32")
    result = Evaluator(tiny_llama, windows, batch_size=2).evaluate(allocation)
    assert len(result.window_kl) == 3 and np.mean(result.window_kl) == pytest.approx(result.kl, rel=1e-12)
    assert len(set(result.window_kl)) == 3  # different text, different KL
    for index in range(3):
        alone = replace(windows, inputs=windows.inputs[index:index + 1])
        assert Evaluator(tiny_llama, alone).evaluate(allocation).kl == pytest.approx(result.window_kl[index], rel=1e-6)
    measured = MeasuredKL(Evaluator(tiny_llama, windows, batch_size=2))
    formats = type("A", (), {"formats": allocation})()
    assert measured(formats, 40).tolist() == pytest.approx(list(result.window_kl[:2]), rel=1e-9)

"""NNCF's sensitivity scores against a direct re-computation of nncf's formulas (numpy, written out here)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from bitalloc.quant.hessian import collect_hessians
from bitalloc.quant.sensitivity import (
    CRITERIA,
    activation_statistics,
    hessian_activation_from_hessian,
    int8_asym,
    nncf_score,
    nncf_scores,
    weight_quantization_error,
)
from bitalloc.quant.units import Unit


def nncf_int8_asym_numpy(w: np.ndarray) -> np.ndarray:
    """nncf's do_int_quantization + do_int_dequantization, INT8_ASYM, reduction axis 1 (float32)."""
    w = w.astype(np.float32)
    lo, hi = w.min(axis=1, keepdims=True), w.max(axis=1, keepdims=True)
    scale = np.array((hi - lo) / 255).astype(np.float32)  # levels = 256, narrow_range False
    eps = np.finfo(np.float32).eps
    scale[np.abs(scale) < eps] = eps
    zp = np.clip((0 - np.round(lo / scale)).astype(np.int32), 0, 255)
    q = np.clip(np.round(w / scale + zp.astype(np.float32)), 0, 255)
    return (q - zp).astype(np.float32) * scale


def model_and_batches(seed: int = 0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    model[0].weight.data[3] += 2.0  # a row with a shifted range (zero point far from the middle)
    batches = [torch.randn(3, 5, 16) * torch.linspace(0.2, 3.0, 16) + 0.5 for _ in range(2)]
    units = [Unit("0", "weight", (24, 16)), Unit("2", "weight", (8, 24))]
    return model, batches, units


def test_int8_asym_and_its_error_match_nncf_numpy():
    w = torch.randn(12, 40) * 0.1
    w[0] = torch.rand(40) + 1.0  # all positive: the zero point clips to 0
    w[1] = 0.0  # a constant row: the scale falls back to eps
    expected = nncf_int8_asym_numpy(w.numpy())
    assert np.allclose(int8_asym(w).numpy(), expected, rtol=0, atol=1e-7)
    assert weight_quantization_error(w) == pytest.approx(float(((expected - w.numpy()) ** 2).mean(axis=1).max()), rel=1e-5)


def test_activation_statistics_follow_nncf_reducers_and_aggregators():
    model, batches, units = model_and_batches()
    stats = activation_statistics(model, units, batches, subset_size=5)  # 6 samples: the last is dropped
    xs = [b[i:i + 1].double().numpy() for b in batches for i in range(3)][:5]  # layer "0" sees the model input
    container = 0.0
    for x in xs:  # HAWQAggregator, as written
        container = (container + float((x * x).sum())) / x.size
    s = stats["0"]
    assert s.samples == 5
    assert s.hessian_input_activation == pytest.approx(container * 2 / 5)
    assert s.mean_activation_variance == pytest.approx(np.mean([x.var(axis=-2).mean() for x in xs]))
    assert s.max_activation_variance == pytest.approx(np.mean([x.var(axis=-2).max() for x in xs]))
    assert s.mean_activation_magnitude == pytest.approx(np.mean([np.abs(x).max(axis=-2).mean() for x in xs]))
    assert stats["2"].samples == 5


@pytest.mark.parametrize("criterion", CRITERIA)
def test_scores_equal_the_criterion_formula(criterion):
    model, batches, units = model_and_batches(1)
    scores = nncf_scores(model, units, criterion, batches)
    stats = activation_statistics(model, units, batches)
    assert nncf_scores(model, units, criterion, stats=stats) == scores
    for unit, layer in zip(units, (model[0], model[2])):
        w = layer.weight.detach().numpy()
        dq = nncf_int8_asym_numpy(w)
        error = float(((dq - w) ** 2).mean(axis=1).max())
        inverse = 1 / (error + np.finfo(np.float32).eps)
        expected = {
            "weight_quantization_error": inverse,
            "hessian_input_activation": float(np.linalg.norm(dq - w)) * stats[unit.name].hessian_input_activation,
            "mean_activation_variance": inverse * stats[unit.name].mean_activation_variance,
            "max_activation_variance": inverse * stats[unit.name].max_activation_variance,
            "mean_activation_magnitude": inverse * stats[unit.name].mean_activation_magnitude,
        }[criterion]
        assert scores[unit.name] == pytest.approx(expected, rel=1e-5)


def test_hessian_activation_from_the_profiles_hessian_is_twice_the_mean_square():
    model, batches, units = model_and_batches(2)
    hessians = collect_hessians(model, units, batches)
    x = torch.cat([b.reshape(-1, 16) for b in batches]).double()
    tokens = x.shape[0]
    assert hessian_activation_from_hessian(hessians["0"], tokens) == pytest.approx(2 * float((x * x).mean()), rel=1e-5)
    scores = nncf_scores(model, units, "hessian_input_activation", hessians=hessians, tokens=tokens)
    w = model[0].weight.detach()
    assert scores["0"] == pytest.approx(float(torch.linalg.norm(int8_asym(w) - w)) * 2 * float((x * x).mean()), rel=1e-5)


def test_bad_requests_are_refused():
    model, batches, units = model_and_batches()
    with pytest.raises(ValueError, match="unknown NNCF"):
        nncf_score(model[0].weight, "entropy")
    with pytest.raises(ValueError, match="needs calibration batches"):
        nncf_scores(model, units, "max_activation_variance")
    conv = nn.Sequential(nn.Conv2d(1, 2, 3))
    with pytest.raises(ValueError, match="MatMul"):
        activation_statistics(conv, [Unit("0", "weight", (2, 9))], [torch.randn(1, 1, 5, 5)])

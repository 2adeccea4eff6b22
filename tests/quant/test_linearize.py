"""KLGradient: the measured KL linearised around an allocation, checked by finite differences."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bitalloc.quant.calibration import calibration_tokens
from bitalloc.quant.evaluate import Evaluator, uniform
from bitalloc.quant.formats import get_format
from bitalloc.quant.linearize import KLGradient
from bitalloc.quant.quantizers import simulate
from bitalloc.quant.simulation import applied
from bitalloc.quant.units import enumerate_units, weight_matrix

FORMATS = ["int2_g32", "int4_g32", "int8_g32"]


@pytest.fixture(scope="module")
def setup(tiny_llama):
    windows = calibration_tokens(tiny_llama.tokenizer, "zoo:calibration", seq_len=32, count=4, seed=3)
    evaluator = Evaluator(tiny_llama, windows, batch_size=2, weight_cache_bytes=1e8)
    units = enumerate_units(tiny_llama.module, kv_cache=True).units
    names = [u.name for u in units]
    allowed = np.ones((len(names), len(FORMATS)), dtype=bool)
    allowed[1, 0] = False
    allocation = {u.name: "int4_g32" for u in units if u.kind == "weight"}
    return evaluator, units, names, allowed, allocation


def kl_with(evaluator, allocation, name, delta) -> float:
    """The measured KL with ``allocation`` applied and ``delta`` added to one unit's weight."""
    module = dict(evaluator.model.module.named_modules())[name]
    with applied(evaluator.model, allocation, cache=evaluator.weights):
        with torch.no_grad():
            module.weight.add_(delta)
        return evaluator.evaluate({}).kl


def test_linear_cells_match_central_differences_of_the_measured_kl(setup) -> None:
    evaluator, units, names, allowed, allocation = setup
    cells = KLGradient(evaluator, names, FORMATS, allowed)(SimpleNamespace(formats=allocation))
    for i in (3, 6):
        name = names[i]
        w = weight_matrix(dict(evaluator.model.module.named_modules())[name]).detach().float()
        direction = simulate(w, get_format("int8_g32"), "rtn") - simulate(w, get_format("int4_g32"), "rtn")
        t = 0.25
        slope = (kl_with(evaluator, allocation, name, t * direction) - kl_with(evaluator, allocation, name, -t * direction)) / (2 * t)
        assert abs(slope) > 1e-6 and cells[i, FORMATS.index("int8_g32")] == pytest.approx(slope, rel=0.05)


def test_cells_are_zero_at_the_allocations_own_format_for_caches_and_where_not_allowed(setup) -> None:
    evaluator, units, names, allowed, allocation = setup
    cells = KLGradient(evaluator, names, FORMATS, allowed)(SimpleNamespace(formats=allocation))
    weights = [i for i, u in enumerate(units) if u.kind == "weight"]
    caches = [i for i, u in enumerate(units) if u.kind != "weight"]
    assert caches and np.all(cells[caches] == 0)
    assert np.all(cells[weights, FORMATS.index("int4_g32")] == 0)
    assert cells[1, 0] == 0
    assert np.count_nonzero(cells[weights][:, [0, 2]]) >= len(weights)  # the other formats do move the KL


def test_gradients_leave_the_model_as_it_was(setup, tiny_llama) -> None:
    evaluator, _, names, allowed, allocation = setup
    before = {k: v.clone() for k, v in tiny_llama.module.state_dict().items()}
    flags = [p.requires_grad for p in tiny_llama.module.parameters()]
    KLGradient(evaluator, names, FORMATS, allowed).gradients(allocation)
    after = tiny_llama.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in tiny_llama.module.parameters()] == flags
    assert all(p.grad is None for p in tiny_llama.module.parameters())
    assert evaluator.evaluate(uniform([], "int4_g32")).kl == 0.0

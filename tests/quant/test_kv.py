"""KV-cache simulation: the KIVI layouts, the cache that applies them, and their measured KL."""

import numpy as np
import pytest
import torch
from transformers import DynamicCache

from bitalloc.quant.calibration import calibration_tokens
from bitalloc.quant.evaluate import Evaluator
from bitalloc.quant.formats import get_format
from bitalloc.quant.kv import KVOptions
from bitalloc.quant.kv_sim import SimulatedKVCache, fake_quantize_keys, fake_quantize_values, kv_applied, kv_plan
from bitalloc.quant.profile import build_profile
from bitalloc.quant.units import enumerate_units

INT4 = get_format("int4_g32_asym")


def on_grid(rows: int, columns: int, seed: int) -> torch.Tensor:
    """``[rows, columns]`` lying exactly on int4 asymmetric groups of 32 along the columns, each row
    on its own scale (magnitudes over three decades, like outlier channels)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (rows, columns), generator=g)
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every group spans the whole grid
    scales = (10 ** (torch.rand(rows, 1, generator=g) * 3 - 2)).half().float()
    offsets = (-8 * scales).half().float()
    return codes.float() * scales + offsets


def test_keys_are_quantized_per_channel_along_tokens():
    batch, heads, tokens, head_dim = 2, 3, 64, 16
    channels = on_grid(batch * heads * head_dim, tokens, seed=0)  # rows: (batch, head, channel)
    keys = channels.reshape(batch, heads, head_dim, tokens).transpose(-1, -2)
    assert torch.equal(fake_quantize_keys(keys, INT4), keys)
    assert not torch.allclose(fake_quantize_values(keys, INT4), keys, rtol=1e-3, atol=0)


def test_values_are_quantized_per_token_along_head_dim():
    batch, heads, tokens, head_dim = 2, 3, 16, 64
    values = on_grid(batch * heads * tokens, head_dim, seed=1).reshape(batch, heads, tokens, head_dim)
    assert torch.equal(fake_quantize_values(values, INT4), values)
    assert not torch.allclose(fake_quantize_keys(values, INT4), values, rtol=1e-3, atol=0)


def test_simulated_cache_quantizes_only_the_planned_caches(tiny_llama):
    plan = kv_plan({"kv.1.key": "int2_g32", "kv.0.value": "int3_pc", "kv.0.key": "bf16",
                    "model.layers.0.mlp.up_proj": "int4_g128"})
    assert set(plan) == {0, 1} and plan[0].key is None and plan[1].value is None
    cache = SimulatedKVCache(tiny_llama.module.config, plan)
    g = torch.Generator().manual_seed(0)
    states = [(torch.randn(1, 2, 40, 16, generator=g), torch.randn(1, 2, 40, 16, generator=g)) for _ in range(2)]
    k0, v0 = cache.update(*states[0], 0)
    k1, v1 = cache.update(*states[1], 1)
    assert torch.equal(k0, states[0][0]) and torch.equal(v1, states[1][1])
    assert torch.equal(v0, fake_quantize_values(states[0][1], get_format("int3_pc")))
    assert torch.equal(k1, fake_quantize_keys(states[1][0], get_format("int2_g32")))
    assert torch.equal(cache.layers[1].keys, states[1][0])  # what is stored stays exact
    # A decode step re-quantizes from the exact states: complete key groups round as before.
    step = torch.randn(1, 2, 1, 16, generator=g)
    k1_next, _ = cache.update(step, step, 1)
    assert k1_next.shape[-2] == 41 and torch.equal(k1_next[..., :32, :], k1[..., :32, :])


def test_plan_rejects_formats_and_names_a_cache_cannot_take():
    with pytest.raises(ValueError, match="kv.0.key"):
        kv_plan({"kv.0.key": "nf4_g64"})
    with pytest.raises(KeyError, match="kv.0.keys"):
        kv_plan({"kv.0.keys": "int4_g32"})


@pytest.fixture(scope="module")
def windows(tiny_llama):
    return calibration_tokens(tiny_llama.tokenizer, "zoo:calibration", seq_len=32, count=2, seed=0)


@pytest.fixture(scope="module")
def evaluator(tiny_llama, windows):
    return Evaluator(tiny_llama, windows, batch_size=2)


def test_kv_kl_is_zero_at_16_bits_and_grows_as_bits_shrink(tiny_llama, evaluator):
    with kv_applied(tiny_llama, {"kv.0.key": "bf16", "kv.0.value": "fp16", "kv.1.value": "bf16"}):
        assert evaluator.evaluate({}).kl == 0.0
    kl = {}
    for fmt in ("int2_g32", "int8_g32"):
        with kv_applied(tiny_llama, {"kv.0.value": fmt}):
            kl[fmt] = evaluator.evaluate({}).kl
    assert kl["int2_g32"] > 10 * kl["int8_g32"] > 0
    with pytest.raises(ValueError, match="own cache"), kv_applied(tiny_llama, {"kv.0.value": "int2_g32"}):
        tiny_llama.module(torch.arange(4)[None], past_key_values=DynamicCache())
    assert not tiny_llama.module._forward_pre_hooks  # the hook is gone after an error too


def test_profile_measures_the_kv_rows(tiny_llama, windows):
    units = enumerate_units(tiny_llama.module, include=["*layers.0.mlp.down_proj"], kv_cache=True)
    formats = [get_format(n) for n in ("bf16", "int2_g32", "int8_g32", "nf4_g64")]
    profile = build_profile(tiny_llama, units, formats, "output_mse", windows, kv=KVOptions(context=1024),
                            options={"kl_tokens": 64})
    kv_rows = [i for i, u in enumerate(units.units) if u.kind != "weight"]
    errors = profile.error[kv_rows]
    assert (errors[:, 0] == 0).all() and np.isnan(errors[:, 3]).all() and not profile.allowed[kv_rows, 3].any()
    assert (errors[:, 1:3] >= 0).all()  # a random model's keys barely matter: its key cells sit at the noise floor
    value_rows = [j for j, i in enumerate(kv_rows) if units.units[i].kind == "kv_value"]
    assert (errors[value_rows, 1] > 10 * errors[value_rows, 2]).all()

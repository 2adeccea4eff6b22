"""Fixtures for the quant tests that need a real model's structure but not its weights."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def smollm2_units(zoo):
    """SmolLM2-135M's units (K/V caches included) and tie groups, from its config on the meta device (no weights)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from bitalloc.quant.units import enumerate_units
    from bitalloc.quant.zoo import zoo_model_dir

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(zoo_model_dir("llm")))
    return enumerate_units(model, kv_cache=True)

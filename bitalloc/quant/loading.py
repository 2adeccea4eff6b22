"""Turn a model spec into a module (and a tokenizer, for language models).

Specs:

* ``factory:NAME``: a registered factory (``register_factory``), e.g. ``factory:tiny-llama``;
* ``SCHEME:NAME``: a model folder a registered scheme names (``register_scheme``), e.g.
  ``zoo:llm`` / ``zoo:cnn``, the reference models built by ``bitalloc zoo build``;
* a local directory: a transformers model (``config.json`` + safetensors), or a plain
  PyTorch module saved by bitalloc (``bitalloc_model.json`` naming a registered
  architecture + ``model.safetensors``);
* a local ``.gguf`` file, loaded (dequantized) through transformers' GGUF support;
* a hub id (``org/name``), through transformers, which needs the hub to be reachable.

Factories, architectures and schemes register themselves from the plugins
(``quant.plugins``), imported before the first load: the reference zoo is one, and a user's
package can add its own the same way, without this module importing any of them.

Safety: pickled weights (``.bin``, ``.pt``) are refused and ``trust_remote_code`` is off
unless the ``LoadPolicy`` allows them; when ``model_roots`` are configured, a local path
must resolve inside one of them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from bitalloc.quant.plugins import load_plugins
from bitalloc.quant.units import DEFAULT_EXCLUDE, UnitSet, enumerate_units

MODULE_MANIFEST = "bitalloc_model.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


class ModelLoadError(ValueError):
    """A model spec that cannot be loaded, with the reason in words."""


@dataclass(frozen=True)
class LoadPolicy:
    """What the operator allows a job to read: pickled weights, remote code, and (when
    ``model_roots`` are set) local files only inside those folders."""

    allow_pickle: bool = False
    trust_remote_code: bool = False
    model_roots: tuple[Path, ...] = ()

    def check_path(self, path: Path, what: str) -> None:
        """Refuse a local ``path`` outside the model roots (``what`` names it in the message)."""
        if not self.model_roots:
            return
        resolved = path.expanduser().resolve()
        if not any(resolved.is_relative_to(Path(root).expanduser().resolve()) for root in self.model_roots):
            raise ModelLoadError(f"{what} {path} is outside the configured model roots")


@dataclass
class LoadedModel:
    """A module ready to profile, with what is needed to feed it.

    ``example_inputs`` (keyword dict or positional tuple) runs one small forward pass;
    ``quant.units`` uses it to find the modules that share an input.
    """

    spec: str
    module: nn.Module
    tokenizer: Any | None = None
    example_inputs: dict | tuple | None = None
    info: dict = field(default_factory=dict)

    @property
    def is_causal_lm(self) -> bool:
        return self.tokenizer is not None

    def units(self, *, kv_cache: bool = False, include: Sequence[str] | None = None,
              exclude: Sequence[str] = DEFAULT_EXCLUDE) -> UnitSet:
        """The model's units (``units.enumerate_units``, with its ``include`` and ``exclude``), tie
        groups found by running ``example_inputs``."""
        return enumerate_units(self.module, include=include, exclude=exclude, example_inputs=self.example_inputs,
                               kv_cache=kv_cache)


Factory = Callable[[], LoadedModel]
Scheme = Callable[[str], Path]
_FACTORIES: dict[str, Factory] = {}
_ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}
_SCHEMES: dict[str, Scheme] = {}


def register_factory(name: str, factory: Factory) -> None:
    """Make ``factory:NAME`` load what ``factory()`` returns."""
    _FACTORIES[name] = factory


def register_architecture(name: str, builder: Callable[..., nn.Module]) -> None:
    """Let a module directory whose manifest names ``name`` be rebuilt by ``builder(**kwargs)``."""
    _ARCHITECTURES[name] = builder


def register_scheme(prefix: str, resolve: Scheme) -> None:
    """Make ``PREFIX:NAME`` load the model folder ``resolve(NAME)`` returns.

    The folder is the scheme's own (a managed cache), so it is not held to the model roots;
    ``resolve`` raises ``ModelLoadError`` for a name it does not know."""
    _SCHEMES[prefix] = resolve


def build_module(architecture: str, kwargs: dict | None = None) -> nn.Module:
    """A fresh module of a registered architecture; ``ModelLoadError`` names the registered ones otherwise."""
    load_plugins()
    if architecture not in _ARCHITECTURES:
        raise ModelLoadError(f"unknown architecture {architecture!r}; registered: {sorted(_ARCHITECTURES)}")
    return _ARCHITECTURES[architecture](**(kwargs or {}))


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
"""The dtypes a model may run in, by the names jobs use (``--dtype``)."""


def model_dtype(name: str, device: torch.device | str = "cpu") -> torch.dtype:
    """``fp32``, ``bf16`` or ``fp16``; ``auto`` is bf16 on a GPU (half the memory and traffic, the
    precision models are trained and served in) and fp32 on the CPU, where 16-bit matmuls gain
    nothing. Whatever the model runs in, Hessians accumulate in float32, Fisher and KL sums in float64."""
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"dtype {name!r}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def load_model(spec: str, policy: LoadPolicy = LoadPolicy(), dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> LoadedModel:
    """Load ``spec`` in ``dtype`` and eval mode onto ``device``; ``ModelLoadError`` says why when it cannot."""
    check_model_spec(spec, policy)
    spec = spec.strip()
    if spec.startswith("factory:"):
        name = spec.removeprefix("factory:")
        if name not in _FACTORIES:
            raise ModelLoadError(f"unknown factory {name!r}; registered: {sorted(_FACTORIES)}")
        loaded = _FACTORIES[name]()
    elif (scheme := spec.partition(":")[0]) in _SCHEMES:
        loaded = _load_local(_SCHEMES[scheme](spec.partition(":")[2]), policy, dtype, check_roots=False)
    elif _looks_like_path(spec):
        loaded = _load_local(Path(spec).expanduser(), policy, dtype, check_roots=True)
    elif _HUB_ID.match(spec):
        loaded = _load_transformers(spec, policy, dtype)
    else:
        raise ModelLoadError(f"model spec {spec!r} is neither a path, a hub id (org/name), "
                             f"factory:NAME nor one of {sorted(f'{prefix}:NAME' for prefix in _SCHEMES)}")
    loaded.spec = spec
    loaded.module.to(device=device, dtype=dtype).eval()
    return loaded


def model_folder(spec: str, policy: LoadPolicy = LoadPolicy()) -> Path | None:
    """The local transformers folder with safetensors weights that ``spec`` names, which a model can
    be streamed from block by block; None for a factory, a hub id, a ``.gguf`` or a plain module."""
    check_model_spec(spec, policy)
    spec = spec.strip()
    if spec.startswith("factory:"):
        return None
    if (scheme := spec.partition(":")[0]) in _SCHEMES:
        path = _SCHEMES[scheme](spec.partition(":")[2])
    elif _looks_like_path(spec):
        path = Path(spec).expanduser()
    else:
        return None
    if path.is_dir() and (path / "config.json").exists() and not (path / MODULE_MANIFEST).exists() \
            and any(path.glob("*.safetensors")):
        return path
    return None


def _looks_like_path(spec: str) -> bool:
    return spec.startswith(("/", ".", "~")) or Path(spec).exists() or spec.endswith(".gguf")


def check_model_spec(spec: str, policy: LoadPolicy) -> None:
    """What can be refused before anything loads: an empty spec, or a local path outside the
    model roots. ``load_model`` checks the same, so a job is held to it at submit and in the worker."""
    load_plugins()
    spec = spec.strip()
    if not spec:
        raise ModelLoadError("model spec is empty")
    if spec.startswith("factory:") or spec.partition(":")[0] in _SCHEMES:
        return
    if _looks_like_path(spec):
        policy.check_path(Path(spec), "model path")


def _load_local(path: Path, policy: LoadPolicy, dtype: torch.dtype, *, check_roots: bool) -> LoadedModel:
    if check_roots:
        policy.check_path(path, "model path")
    if not path.exists():
        raise ModelLoadError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix == ".gguf":
            return _load_transformers(str(path.parent), policy, dtype, gguf_file=path.name)
        raise ModelLoadError(f"model path {path} is a file; expected a model directory or a .gguf file")
    if (path / MODULE_MANIFEST).exists():
        return _load_module_dir(path, policy)
    if not (path / "config.json").exists():
        raise ModelLoadError(f"{path} is not a model directory: it has neither config.json nor {MODULE_MANIFEST}")
    has_safetensors = any(path.glob("*.safetensors"))
    if not has_safetensors and not policy.allow_pickle:
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled:
            raise ModelLoadError(
                f"{path} holds only pickled weights ({', '.join(pickled)}); loading them can run arbitrary "
                "code, so it is refused unless the operator allows pickle (BITALLOC_ALLOW_PICKLE=1)"
            )
        raise ModelLoadError(f"{path} has a config.json but no weights (*.safetensors)")
    return _load_transformers(str(path), policy, dtype)


def _load_transformers(source: str, policy: LoadPolicy, dtype: torch.dtype, gguf_file: str | None = None) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options: dict[str, Any] = {"trust_remote_code": policy.trust_remote_code}
    if gguf_file:
        options["gguf_file"] = gguf_file
    else:
        options["use_safetensors"] = None if policy.allow_pickle else True
    try:
        module = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **options)
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=policy.trust_remote_code, gguf_file=gguf_file)
    except (OSError, ValueError, KeyError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"could not load {source!r} with transformers: {first_line}") from exc
    example = {"input_ids": torch.arange(2, 18).unsqueeze(0) % module.config.vocab_size}
    return LoadedModel(source, module, tokenizer, example, {"architecture": type(module).__name__})


def _load_module_dir(path: Path, policy: LoadPolicy) -> LoadedModel:
    """A plain PyTorch module: a registered architecture rebuilt and filled from safetensors."""
    manifest = json.loads((path / MODULE_MANIFEST).read_text())
    architecture = manifest.get("architecture")
    weights = path / "model.safetensors"
    if not weights.exists():
        raise ModelLoadError(f"{path}: {MODULE_MANIFEST} present but model.safetensors is missing")
    try:
        module = build_module(architecture, manifest.get("kwargs"))
    except ModelLoadError as exc:
        raise ModelLoadError(f"{path}: {exc}") from exc
    module.load_state_dict(load_file(weights))
    shape = manifest.get("example_input_shape")
    example = (torch.zeros(shape),) if shape else None
    return LoadedModel(str(path), module, None, example, {"architecture": architecture, **manifest.get("info", {})})

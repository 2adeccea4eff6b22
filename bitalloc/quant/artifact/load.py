"""Load an artifact back into a runnable model, after proving every byte is the one written.

Verification comes first and is complete: each file's size (a truncated file is named), each
tensor's dtype, shape and sha256 (a corrupt tensor is named), then each file's sha256 (the
safetensors header, config and tokenizer). Only then is the module rebuilt, the unquantized
tensors put back, tied tensors re-tied, and each unit placed as ``storage.decode`` says.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from bitalloc.quant.artifact.manifest import WEIGHTS, Artifact, ArtifactError, dtype_name, tensor_sha256
from bitalloc.quant.artifact.storage import decode
from bitalloc.quant.checksum import file_sha256
from bitalloc.quant.formats import get_format
from bitalloc.quant.loading import LoadedModel


def load_artifact(path: Path | str) -> LoadedModel:
    """The artifact's model (eval mode, on CPU, in the source model's dtype) and tokenizer.

    ``ArtifactError`` names the file or tensor when anything is missing, truncated or corrupt.
    """
    artifact = Artifact.open(path)
    tensors = _verified_tensors(artifact)
    model = _skeleton(artifact)
    units = artifact.manifest["units"]
    unit_tensors = {name for unit in units.values() for name in unit["tensors"]}
    missing, unexpected = model.module.load_state_dict(
        {name: t for name, t in tensors.items() if name not in unit_tensors}, strict=False)
    allowed = {f"{name}.weight" for name in units} | set(artifact.manifest["tied"])
    if unexpected or set(missing) - allowed:
        raise ArtifactError(f"{artifact.path}: the tensors do not fit the model its config builds "
                            f"(missing {sorted(set(missing) - allowed)[:3]}, unexpected {sorted(unexpected)[:3]})")
    for alias, target in artifact.manifest["tied"].items():
        _tie(model.module, alias, target)
    for name, unit in units.items():
        stored = {tensor.removeprefix(f"{name}."): tensors[tensor] for tensor in unit["tensors"]}
        module = model.module.get_submodule(name)
        placed = decode(stored, get_format(unit["format"]), module)
        if placed is not module:
            parent, _, leaf = name.rpartition(".")
            setattr(model.module.get_submodule(parent), leaf, placed)
    model.module.eval()
    return model


def _verified_tensors(artifact: Artifact) -> dict[str, torch.Tensor]:
    """The artifact's tensors, each checked against the manifest; every file checked too."""
    files = artifact.manifest["files"]
    for name, expected in files.items():
        file = artifact.path / name
        if not file.is_file():
            raise ArtifactError(f"{file}: missing, though the manifest lists it")
        if file.stat().st_size != expected["bytes"]:
            raise ArtifactError(f"{file}: {file.stat().st_size} bytes where the manifest says {expected['bytes']}; "
                                "the file is truncated or altered, so the artifact is refused")
    tensors: dict[str, torch.Tensor] = {}
    for file in artifact.weights:
        weights = artifact.path / file
        try:
            tensors.update(load_file(weights))
        except (SafetensorError, OSError) as exc:
            raise ArtifactError(f"{weights}: not readable as safetensors ({exc}); the artifact is corrupt") from exc
    expected_tensors = artifact.manifest["tensors"]
    if set(tensors) != set(expected_tensors):
        odd = sorted(set(tensors) ^ set(expected_tensors))
        raise ArtifactError(f"{artifact.path}: the weights' tensors differ from the manifest's (e.g. {odd[:3]}); "
                            "the artifact is corrupt")
    for name, expected in expected_tensors.items():
        tensor = tensors[name]
        found = {"dtype": dtype_name(tensor.dtype), "shape": list(tensor.shape), "sha256": tensor_sha256(tensor)}
        if any(found[key] != expected[key] for key in found):
            raise ArtifactError(f"{artifact.path / expected.get('file', WEIGHTS)}: tensor {name!r} does not match the "
                                f"manifest ({', '.join(k for k in found if found[k] != expected[k])} differ); the "
                                "artifact is corrupt")
    for name, expected in files.items():
        if file_sha256(artifact.path / name) != expected["sha256"]:
            raise ArtifactError(f"{artifact.path / name}: sha256 differs from the manifest's; the artifact is corrupt")
    return tensors


def _skeleton(artifact: Artifact) -> LoadedModel:
    """The module as its config or architecture builds it, weights still to be filled."""
    record = artifact.manifest["model"]
    dtype = getattr(torch, record["dtype"])
    info = {"architecture": record["architecture"], "source": record["spec"], "artifact": str(artifact.path)}
    if record["kind"] == "module":
        from bitalloc.quant.loading import ModelLoadError, build_module

        described = record["module"]
        try:
            module = build_module(described["architecture"], described["kwargs"]).to(dtype)
        except ModelLoadError as exc:
            raise ArtifactError(f"{artifact.path}: {exc}") from exc
        shape = described["example_input_shape"]
        return LoadedModel(str(artifact.path), module, None, (torch.zeros(shape),) if shape else None, info)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    module = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(artifact.path), dtype=dtype)
    if (artifact.path / "generation_config.json").is_file():
        module.generation_config = GenerationConfig.from_pretrained(artifact.path)
    tokenizer = AutoTokenizer.from_pretrained(artifact.path) if (artifact.path / "tokenizer_config.json").is_file() else None
    example = {"input_ids": torch.arange(2, 18).unsqueeze(0) % module.config.vocab_size}
    return LoadedModel(str(artifact.path), module, tokenizer, example, info)


def _tie(module: nn.Module, alias: str, target: str) -> None:
    """Make ``alias`` the very tensor ``target`` is, as it was in the source model."""
    parent, _, leaf = alias.rpartition(".")
    try:
        shared: torch.Tensor = module.get_parameter(target)
    except AttributeError:
        shared = module.get_buffer(target)
    setattr(module.get_submodule(parent), leaf, shared)
